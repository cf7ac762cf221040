"""The AnyDressing tab, one Blocks for the WebUI (on_ui_tabs) and for `python -m lib_anydressing ui`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gradio as gr

from . import lora_tab, segment_tab, split_outfit
from .gradio_compat import js_argument

ROOT = Path(__file__).resolve().parent.parent.parent
EXTENSION_SAM_DIR = ROOT / "models" / "sam"


def build_tabs(
    sam_dirs: Callable[[], list[Path]],
    output_dir: Path,
    send_targets: list[segment_tab.SendTarget] = (),
    lora_host: lora_tab.TrainingHost | None = None,
    parser: split_outfit.ParserSource | None = None,
    outfit_targets: list[split_outfit.OutfitTarget] = (),
) -> gr.Blocks:
    """`lora_host`: the WebUI's loaded model and models/Lora; standalone, a checkpoint file and outputs/Lora."""
    host = lora_host or lora_tab.CheckpointHost(output_dir / "Lora")
    with gr.Blocks(analytics_enabled=False, title="AnyDressing") as blocks, gr.Tabs():
        with gr.Tab("Segment garment"):
            segment_tab.build(sam_dirs, output_dir, list(send_targets), parser, list(outfit_targets))
        with gr.Tab("Train garment LoRA"):
            lora_tab.build(sam_dirs, output_dir, host)
    return blocks


def standalone_app(sam_dirs: Callable[[], list[Path]], output_dir: Path, lora_dir: Path | None = None) -> gr.Blocks:
    """The tabs plus the extension's javascript/, which the WebUI would otherwise load itself.
    `lora_dir`: where trained LoRAs go by default (outputs/anydressing/Lora when None)."""
    host = lora_tab.CheckpointHost(lora_dir) if lora_dir is not None else None
    blocks = build_tabs(sam_dirs, output_dir, lora_host=host)
    scripts = "\n".join(p.read_text() for p in sorted((ROOT / "javascript").glob("*.js")))
    with blocks:
        blocks.load(None, None, None, **js_argument(f"() => {{ {scripts} }}"))
    return blocks
