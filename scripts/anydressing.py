"""AnyDressing in txt2img and img2img: the WebUI entry point; the logic is in lib_anydressing.webui."""

import modules.scripts as scripts
from modules import script_callbacks

from lib_anydressing.convert import convert_dropped
from lib_anydressing.generation.options import from_script_args
from lib_anydressing.webui import env, ui
from lib_anydressing.webui.controller import Controller

controller = Controller(env.A1111Env())


def refresh_models() -> list[str]:
    dirs = controller.env.model_dirs()
    for folder in dirs:
        for message in convert_dropped(folder):
            print(f"[AnyDressing] {message}")
    return ui.model_choices(dirs)


class AnyDressingScript(scripts.Script):
    sorting_priority = 15

    def title(self):
        return "AnyDressing"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        components, self.infotext_fields = ui.build(
            self.elem_id, env.max_slots(), controller.env.model_dirs(), refresh_models
        )
        return components

    def process(self, p, *args):
        controller.process(p, from_script_args(args, env.max_slots()))

    def postprocess(self, p, processed, *args):
        controller.finish(p.sd_model.model.diffusion_model)


script_callbacks.on_cfg_denoiser(controller.on_cfg_denoiser)
script_callbacks.on_ui_settings(env.register_settings)
script_callbacks.on_script_unloaded(lambda: controller.finish())
