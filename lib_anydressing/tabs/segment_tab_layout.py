"""The Segment tab's components, one function per panel, each returning its components by name, so the
wiring in segment_tab.py reads `ui.brush.add.click(...)` rather than indexing lists. No handlers here.

The `elem_id`s are javascript/anydressing.js's and the browser tests' hooks: keep them as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import torch

from ..segment.segmenter import GRABCUT
from ..segment.session import BOX, NEGATIVE, POSITIVE, SegmentState
from .gradio_compat import GRADIO_4

LARGEST, FROM_PHOTO = "largest object", "the prompts clicked on the photo above"
LOAD_PREVIEW = "Load the preview to paint on"


@dataclass(frozen=True)
class PromptPanel:
    """Left column: the photo to click on, what a click adds, the model that turns clicks into a mask."""

    photo: gr.Image
    mode: gr.Radio
    undo: gr.Button
    clear: gr.Button
    model: gr.Dropdown
    device: gr.Radio
    refresh: gr.Button
    free: gr.Button
    status: gr.Markdown


@dataclass(frozen=True)
class MaskPanel:
    """Right column: the mask over the photo, SAM's candidates, and the edits applied to the mask."""

    preview: gr.Image
    candidates: gr.Gallery
    choice: gr.Radio
    grow: gr.Slider
    feather: gr.Slider
    fill: gr.Checkbox
    largest: gr.Checkbox
    invert: gr.Checkbox


@dataclass(frozen=True)
class BrushPanel:
    """A canvas to paint corrections on, and the buttons that apply them to the mask."""

    canvas: gr.components.Component  # gr.Image (gradio 3) or gr.ImageEditor (gradio 4): see brush_canvas
    add: gr.Button
    subtract: gr.Button
    load: gr.Button


@dataclass(frozen=True)
class OutputPanel:
    """The three results, and where they can be saved."""

    cutout: gr.Image
    mask: gr.Image
    square: gr.Image
    square_size: gr.Radio
    save: gr.Button
    to_dataset: gr.Button
    saved: gr.Markdown


@dataclass(frozen=True)
class SendPanel:
    """Which WebUI input the cutout goes to (only in the WebUI, where there are send targets)."""

    target: gr.Dropdown
    send: gr.Button


@dataclass(frozen=True)
class BatchPanel:
    """The same prompt on every photo of a folder."""

    folder: gr.Textbox
    out: gr.Textbox
    template: gr.Radio
    run: gr.Button
    report: gr.Dataframe


@dataclass(frozen=True)
class SegmentLayout:
    """All of the tab's components; `state` is the per-session SegmentState."""

    state: gr.State
    prompts: PromptPanel
    mask: MaskPanel
    brush: BrushPanel
    outputs: OutputPanel
    send: SendPanel | None
    batch: BatchPanel

    @property
    def edit_inputs(self) -> list[gr.components.Component]:
        """The controls whose values every handler gets after its own inputs, in segment_tab.Edits' order."""
        m = self.mask
        return [m.grow, m.feather, m.fill, m.largest, m.invert, m.choice, self.outputs.square_size]

    @property
    def views(self) -> list[gr.components.Component]:
        """What a re-render updates: the preview, the candidates, the three results and the status line."""
        o = self.outputs
        return [self.mask.preview, self.mask.candidates, o.cutout, o.mask, o.square, self.prompts.status]


def segment_layout(models: list[str], status: str, batch_dir: Path, send_labels: list[str]) -> SegmentLayout:
    """The tab's components in page order, inside the caller's Blocks/Tab context. `models`: the model
    choices (GrabCut first); `status`: the initial status line; no Send control when `send_labels` is empty."""
    state = gr.State(SegmentState())
    with gr.Row():
        prompts = _prompt_panel(models, status)
        mask = _mask_panel()
    brush = _brush_panel()
    outputs = _output_panel()
    send = _send_panel(send_labels) if send_labels else None
    return SegmentLayout(state, prompts, mask, brush, outputs, send, _batch_panel(batch_dir))


def _prompt_panel(models: list[str], status: str) -> PromptPanel:
    with gr.Column():
        photo = gr.Image(label="Photo: click on the garment", type="pil", elem_id="anydressing_segment_photo")
        with gr.Row():
            mode = gr.Radio([POSITIVE, NEGATIVE, BOX], value=POSITIVE, label="Click adds",
                            elem_id="anydressing_segment_mode")  # fmt: skip
        with gr.Row():
            undo = gr.Button("Undo", elem_id="anydressing_segment_undo")
            clear = gr.Button("Clear", elem_id="anydressing_segment_clear")
        with gr.Row():
            model = gr.Dropdown(models, value=GRABCUT, label="Segmentation model")
            devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
            device = gr.Radio(devices, value="cpu", label="Device")
        with gr.Row():
            refresh = gr.Button("Refresh models")
            free = gr.Button("Free model")
        markdown = gr.Markdown(status, elem_id="anydressing_segment_status")
    return PromptPanel(photo, mode, undo, clear, model, device, refresh, free, markdown)


def _mask_panel() -> MaskPanel:
    with gr.Column():
        preview = gr.Image(label="Preview", type="pil", interactive=False, elem_id="anydressing_segment_preview")
        candidates = gr.Gallery(label="SAM candidates", columns=3, height=160)
        choice = gr.Radio(["best", "1", "2", "3"], value="best", label="Use candidate")
        with gr.Row():
            grow = gr.Slider(-30, 30, 0, step=1, label="Grow (+) / shrink (-), px")
            feather = gr.Slider(0, 30, 0, step=1, label="Feather, px")
        with gr.Row():
            fill = gr.Checkbox(False, label="Fill holes")
            largest = gr.Checkbox(False, label="Largest part only")
            invert = gr.Checkbox(False, label="Invert")
    return MaskPanel(preview, candidates, choice, grow, feather, fill, largest, invert)


def _brush_panel() -> BrushPanel:
    with gr.Accordion("Brush: paint over the preview, then add or subtract", open=False):
        canvas = brush_canvas("anydressing_segment_brush")
        with gr.Row():
            add = gr.Button("Add strokes to the mask")
            subtract = gr.Button("Subtract strokes from the mask")
            load = gr.Button(LOAD_PREVIEW)
    return BrushPanel(canvas, add, subtract, load)


def _output_panel() -> OutputPanel:
    with gr.Row():
        cutout = gr.Image(label="Cutout (RGBA)", type="pil", image_mode="RGBA", interactive=False,
                          elem_id="anydressing_segment_cutout")  # fmt: skip
        mask = gr.Image(label="Mask", type="pil", interactive=False)
        square = gr.Image(label="Garment on white", type="pil", interactive=False)
    with gr.Row():
        square_size = gr.Radio([512, 768], value=512, label="Square size")
        save = gr.Button("Save to outputs", variant="primary")
        to_dataset = gr.Button("Add to LoRA dataset")
        saved = gr.Markdown()
    return OutputPanel(cutout, mask, square, square_size, save, to_dataset, saved)


def _send_panel(labels: list[str]) -> SendPanel:
    with gr.Row():
        target = gr.Dropdown(labels, value=labels[0], label="Send to", elem_id="anydressing_segment_send_to")
        send = gr.Button("Send")
    return SendPanel(target, send)


def _batch_panel(batch_dir: Path) -> BatchPanel:
    with gr.Accordion("Batch: a whole folder", open=False):
        with gr.Row():
            folder = gr.Textbox(label="Folder of photos")
            out = gr.Textbox(str(batch_dir), label="Output folder")
            template = gr.Radio([LARGEST, FROM_PHOTO], value=LARGEST, label="Prompt for every photo")
        run = gr.Button("Run on the folder")
        report = gr.Dataframe(headers=["file", "result"], interactive=False, wrap=True)
    return BatchPanel(folder, out, template, run, report)


def brush_canvas(elem_id: str) -> gr.components.Component:
    """The canvas the Brush paints on. gradio 3 (A1111): an Image with the sketch tool. gradio 4 (Forge)
    dropped `tool`: an ImageEditor with one RGBA layer, a brush and an eraser, no crop, and no upload
    (the preview is loaded into it), so it opens on the brush. segment_tab.strokes_mask reads its value."""
    if GRADIO_4:
        return gr.ImageEditor(
            label="Paint here", type="numpy", image_mode="RGBA", sources=[], transforms=[],
            layers=False, brush=gr.Brush(colors=["rgb(255, 0, 200)"], color_mode="fixed"),
            interactive=True, elem_id=elem_id,
        )  # fmt: skip
    return gr.Image(label="Paint here", tool="sketch", type="numpy", source="upload", interactive=True,
                    elem_id=elem_id)  # fmt: skip
