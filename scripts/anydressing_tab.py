"""The AnyDressing tab of the WebUI (Segment garment); built by lib_anydressing.ui like the standalone app."""

from pathlib import Path

from modules import paths, script_callbacks

from lib_anydressing.ui.app import EXTENSION_SAM_DIR, build_tabs


def sam_dirs() -> list[Path]:
    return [EXTENSION_SAM_DIR, Path(paths.models_path) / "sam"]


def on_ui_tabs():
    return [(build_tabs(sam_dirs, Path(paths.data_path) / "outputs" / "anydressing"), "AnyDressing", "anydressing")]


script_callbacks.on_ui_tabs(on_ui_tabs)
