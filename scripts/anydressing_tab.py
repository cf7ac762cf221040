"""The AnyDressing tab of the WebUI (Segment garment); built by lib_anydressing.ui like the standalone app."""

from pathlib import Path

from modules import paths, script_callbacks

from lib_anydressing.segment import api
from lib_anydressing.ui.app import EXTENSION_SAM_DIR, build_tabs
from lib_anydressing.ui.segment_tab import SEGMENTER


def sam_dirs() -> list[Path]:
    return [EXTENSION_SAM_DIR, Path(paths.models_path) / "sam"]


def on_ui_tabs():
    return [(build_tabs(sam_dirs, Path(paths.data_path) / "outputs" / "anydressing"), "AnyDressing", "anydressing")]


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_app_started(lambda demo, app: api.register(app, SEGMENTER, sam_dirs))
