"""AnyDressing in txt2img and img2img: the WebUI entry point; the logic is in lib_anydressing.webui."""

import modules.scripts as scripts
from modules import script_callbacks

from lib_anydressing.convert import convert_dropped
from lib_anydressing.generation.options import apply_overrides, from_script_args
from lib_anydressing.webui import accordion, env, photo, xyz
from lib_anydressing.webui.controller import Controller

controller = Controller(env.A1111Env())


def refresh_models() -> list[str]:
    dirs = controller.env.model_dirs()
    for folder in dirs:
        for message in convert_dropped(folder):
            print(f"[AnyDressing] {message}")
    return accordion.model_choices(dirs)


class AnyDressingScript(scripts.Script):
    sorting_priority = 15

    def title(self):
        return "AnyDressing"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        self.n_slots = env.max_slots()  # the args follow the UI as built, until the UI is reloaded
        tab = "img2img" if is_img2img else "txt2img"
        status = photo.parser_status(controller.env.parser_dirs(), controller.env.parser_name())
        components, self.infotext_fields = accordion.build(
            self.elem_id, self.n_slots, controller.env.model_dirs(), refresh_models, tab, status
        )
        return components

    def process(self, p, *args):
        opts = from_script_args(args, getattr(self, "n_slots", env.max_slots()))
        apply_overrides(opts, xyz.overrides(p))
        controller.process(p, opts)

    def process_batch(self, p, *args, **kwargs):
        controller.process_batch(p)

    def process_before_every_sampling(self, p, *args, **kwargs):  # Forge only
        controller.before_sampling(p)

    def postprocess(self, p, processed, *args):
        controller.postprocess(p, processed)


def add_xyz_axes():
    for data in scripts.scripts_data:
        if data.script_class.__module__ == "xyz_grid.py":
            xyz.add_axes(data.module, env.max_slots())


script_callbacks.on_before_ui(add_xyz_axes)
script_callbacks.on_cfg_denoiser(controller.on_cfg_denoiser)
script_callbacks.on_cfg_denoised(controller.on_cfg_denoised)
script_callbacks.on_cfg_after_cfg(controller.on_cfg_after_cfg)
script_callbacks.on_ui_settings(env.register_settings)
script_callbacks.on_script_unloaded(lambda: controller.finish())
