"""The AnyDressing tab of the WebUI (Segment garment, Train garment LoRA); built by lib_anydressing.tabs like
the standalone app."""

from pathlib import Path

from modules import paths, script_callbacks

from lib_anydressing.segment import api
from lib_anydressing.segment.parser import PARSERS
from lib_anydressing.tabs.app import EXTENSION_SAM_DIR, build_tabs
from lib_anydressing.tabs.segment_tab import SEGMENTER, SendTarget
from lib_anydressing.tabs.split_outfit import OutfitTarget
from lib_anydressing.webui.accordion import SLOT_CATEGORIES, SLOT_IMAGES
from lib_anydressing.webui.env import A1111Env
from lib_anydressing.webui.lora_training import WebUIHost

ENV = A1111Env()

INPAINT_UPLOAD = {}  # A1111's img2img "Inpaint upload" photo and mask, caught as they are created


def sam_dirs() -> list[Path]:
    return [EXTENSION_SAM_DIR, Path(paths.models_path) / "sam"]


def catch_inpaint_upload(component, **kwargs):
    if kwargs.get("elem_id") in ("img_inpaint_base", "img_inpaint_mask"):
        INPAINT_UPLOAD[kwargs["elem_id"]] = component


def send_targets() -> list[SendTarget]:
    targets = [
        SendTarget(f"{tab} garment {i + 1}", [image], f"switch_to_{tab}()")
        for tab in ("txt2img", "img2img")
        for i, image in enumerate(SLOT_IMAGES.get(tab, []))
    ]
    if len(INPAINT_UPLOAD) == 2:
        pair = [INPAINT_UPLOAD["img_inpaint_base"], INPAINT_UPLOAD["img_inpaint_mask"]]
        targets.append(SendTarget("img2img inpaint upload (photo + mask)", pair, "switch_to_img2img_tab(4)"))
    return targets


def parser():
    """The clothes parser chosen in Settings, on the WebUI's device (the one the img2img script uses)."""
    return PARSERS.get(ENV.parser_dirs(), ENV.parser_name(), ENV.device())


def outfit_targets() -> list[OutfitTarget]:
    return [
        OutfitTarget(f"{tab} garment slots", SLOT_IMAGES[tab], SLOT_CATEGORIES[tab], f"switch_to_{tab}()")
        for tab in ("txt2img", "img2img")
        if SLOT_IMAGES.get(tab)
    ]


def on_ui_tabs():
    output_dir = Path(paths.data_path) / "outputs" / "anydressing"
    tabs = build_tabs(sam_dirs, output_dir, send_targets(), WebUIHost(), parser, outfit_targets())
    return [(tabs, "AnyDressing", "anydressing")]


script_callbacks.on_after_component(catch_inpaint_upload)
script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_app_started(lambda demo, app: api.register(app, SEGMENTER, sam_dirs, parser))
