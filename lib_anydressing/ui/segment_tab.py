"""'Segment garment': click on a garment, get its cutout. Gradio wiring only; the logic is in segment/.

No `from __future__ import annotations` here: gradio finds the `gr.SelectData` parameter by its annotation.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import torch
from PIL import Image

from ..images import ImageInputError
from ..segment.batch import Template, segment_folder
from ..segment.outputs import free_path
from ..segment.sam_models import SamModelError, find_sam_files
from ..segment.segmenter import GRABCUT, SAM_HINT, Segmenter, as_rgb_array
from ..segment.session import BOX, NEGATIVE, POSITIVE, MaskEdits, SegmentState
from .gradio_compat import GRADIO_4, js_argument

SEGMENTER = Segmenter()  # one SAM model per process, freed on request
LARGEST, FROM_PHOTO = "largest object", "the prompts clicked on the photo above"
LOAD_PREVIEW = "Load the preview to paint on"


@dataclass
class SendTarget:
    """Somewhere a cutout can go: garment slot images (one component) or an inpaint pair (photo, mask)."""

    label: str
    components: list[Any]
    switch_js: str = ""  # the WebUI's own tab-switch call, e.g. "switch_to_txt2img()"


def build(sam_dirs: Callable[[], list[Path]], output_dir: Path, send_targets: list[SendTarget] = ()) -> None:
    """Components of the tab, inside the caller's Blocks/Tab context. `send_targets` come from the
    WebUI (garment slots, inpaint upload); standalone there are none and no Send control."""
    state = gr.State(SegmentState())
    with gr.Row():
        with gr.Column():
            photo = gr.Image(label="Photo: click on the garment", type="pil", elem_id="anydressing_segment_photo")
            with gr.Row():
                mode = gr.Radio([POSITIVE, NEGATIVE, BOX], value=POSITIVE, label="Click adds",
                                elem_id="anydressing_segment_mode")  # fmt: skip
            with gr.Row():
                undo = gr.Button("Undo", elem_id="anydressing_segment_undo")
                clear = gr.Button("Clear", elem_id="anydressing_segment_clear")
            with gr.Row():
                model = gr.Dropdown(_choices(sam_dirs), value=GRABCUT, label="Segmentation model")
                device = gr.Radio(
                    ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"], value="cpu", label="Device"
                )
            with gr.Row():
                refresh = gr.Button("Refresh models")
                free = gr.Button("Free model")
            status = gr.Markdown(_status(), elem_id="anydressing_segment_status")
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
    with gr.Accordion("Brush: paint over the preview, then add or subtract", open=False):
        brush = brush_canvas("anydressing_segment_brush")
        with gr.Row():
            brush_add = gr.Button("Add strokes to the mask")
            brush_sub = gr.Button("Subtract strokes from the mask")
            brush_load = gr.Button(LOAD_PREVIEW)
    with gr.Row():
        cutout_out = gr.Image(label="Cutout (RGBA)", type="pil", image_mode="RGBA", interactive=False,
                              elem_id="anydressing_segment_cutout")  # fmt: skip
        mask_out = gr.Image(label="Mask", type="pil", interactive=False)
        square_out = gr.Image(label="Garment on white", type="pil", interactive=False)
    with gr.Row():
        square_size = gr.Radio([512, 768], value=512, label="Square size")
        save = gr.Button("Save to outputs", variant="primary")
        to_dataset = gr.Button("Add to LoRA dataset")
        saved = gr.Markdown()
    if send_targets:
        with gr.Row():
            send_to = gr.Dropdown(
                [t.label for t in send_targets],
                value=send_targets[0].label,
                label="Send to",
                elem_id="anydressing_segment_send_to",
            )
            send = gr.Button("Send")

    with gr.Accordion("Batch: a whole folder", open=False):
        with gr.Row():
            batch_in = gr.Textbox(label="Folder of photos")
            batch_out = gr.Textbox(str(output_dir / "batch"), label="Output folder")
            template = gr.Radio([LARGEST, FROM_PHOTO], value=LARGEST, label="Prompt for every photo")
        batch_run = gr.Button("Run on the folder")
        batch_report = gr.Dataframe(headers=["file", "result"], interactive=False, wrap=True)

    edits_inputs = [grow, feather, fill, largest, invert, choice, square_size]
    views = [preview, candidates, cutout_out, mask_out, square_out, status]

    def render(st: SegmentState, grow_px, feather_px, fill_holes, largest_only, inverted, chosen, size):
        st.choice = None if chosen == "best" else int(chosen) - 1
        edits = MaskEdits(int(grow_px), int(feather_px), fill_holes, largest_only, inverted)
        outs = st.outputs(edits, int(size))
        gallery = []
        if st.result is not None and st.result.candidates is not None:
            c = st.result.candidates
            gallery = [(Image.fromarray(m.astype(np.uint8) * 255), f"{i + 1}: score {s:.2f}")
                       for i, (m, s) in enumerate(zip(c.masks, c.scores, strict=True))]  # fmt: skip
        engine = st.result.engine if st.result is not None else SEGMENTER.engine
        return (st.overlay(edits), gallery, *(outs or (None, None, None)), _status(engine))

    def on_upload(st: SegmentState, image, *edits):
        try:
            st.set_image(None if image is None else as_rgb_array(image))
        except ImageInputError as e:
            st.set_image(None)
            return (st, *render(st, *edits)[:-1], f"⚠ {e}")
        return (st, *render(st, *edits))

    def on_click(st: SegmentState, click_mode, evt: gr.SelectData, *edits):
        if st.image is not None:
            st.click(float(evt.index[0]), float(evt.index[1]), click_mode)
            st.run(SEGMENTER)
        return (st, *render(st, *edits))

    def on_edit(action: str):
        def handler(st: SegmentState, *edits):
            getattr(st, action)()
            st.run(SEGMENTER) if st.points or st.box else setattr(st, "result", None)
            return (st, *render(st, *edits))

        return handler

    def on_model(st: SegmentState, name, dev, *edits):
        try:
            files = find_sam_files(sam_dirs())
            SEGMENTER.load(None if name == GRABCUT else files.get(name), dev)
        except (SamModelError, RuntimeError) as e:
            SEGMENTER.load(None)
            return (st, *render(st, *edits)[:-1], f"⚠ {e}. Using {GRABCUT}.")
        if st.points or st.box:
            st.result = None
            st.run(SEGMENTER)
        return (st, *render(st, *edits))

    def on_save(st: SegmentState, *edits):
        outs = st.outputs(_edits(edits), int(edits[6]))
        if outs is None:
            return "Nothing to save yet: click on the garment first."
        names = []
        for image, stem in zip(outs, ("garment-cutout", "garment-mask", "garment-square"), strict=True):
            path = free_path(output_dir, stem)
            image.save(path)
            names.append(path.name)
        return f"Saved to {output_dir}: " + ", ".join(names)

    photo.upload(on_upload, [state, photo, *edits_inputs], [state, *views])
    photo.select(on_click, [state, mode, *edits_inputs], [state, *views])
    undo.click(on_edit("undo"), [state, *edits_inputs], [state, *views])
    clear.click(on_edit("clear"), [state, *edits_inputs], [state, *views])
    model.change(on_model, [state, model, device, *edits_inputs], [state, *views])
    device.change(on_model, [state, model, device, *edits_inputs], [state, *views])
    refresh.click(lambda: gr.update(choices=_choices(sam_dirs)), outputs=[model])
    free.click(lambda: (SEGMENTER.free(), gr.update(value=GRABCUT), _status())[1:], outputs=[model, status])
    for component in edits_inputs:
        component.change(lambda st, *e: render(st, *e), [state, *edits_inputs], views)
    save.click(on_save, [state, *edits_inputs], [saved])

    def on_dataset(st: SegmentState, *edits):
        outs = st.outputs(_edits(edits), int(edits[6]))
        if outs is None:
            return "Nothing to add yet: click on the garment first."
        path = free_path(output_dir / "lora_dataset", "garment")
        outs[0].save(path)  # the RGBA cutout: its alpha lets training mask the loss to the garment
        return f"Added {path.name} to {path.parent}"

    to_dataset.click(on_dataset, [state, *edits_inputs], [saved])

    if send_targets:
        outputs = [c for t in send_targets for c in t.components]

        def on_send(st: SegmentState, label, *edits):
            outs = st.outputs(_edits(edits), int(edits[6]))
            updates: list[Any] = [gr.update() for _ in outputs]
            if outs is not None:
                start = 0
                for target in send_targets:
                    if target.label == label:
                        whole_photo = Image.fromarray(st.image)
                        values = [outs[0]] if len(target.components) == 1 else [whole_photo, outs[1]]
                        updates[start : start + len(values)] = values
                    start += len(target.components)
            return updates

        calls = json.dumps({t.label: t.switch_js for t in send_targets})
        switch_tab = "(label) => { const call = " + calls + "[label]; if (call) { try { new Function(call)(); }"
        switch_tab += " catch (e) { console.warn(e); } } return []; }"  # the WebUI's switch_to_* may be absent
        send.click(on_send, [state, send_to, *edits_inputs], outputs).then(
            None, [send_to], None, **js_argument(switch_tab)
        )

    def on_brush(add: bool):
        def handler(st: SegmentState, painted, *edits):
            problem = apply_strokes(st, painted, add)
            shown = render(st, *edits)
            return (st, *shown) if problem is None else (st, *shown[:-1], f"⚠ {problem}")

        return handler

    brush_add.click(on_brush(True), [state, brush, *edits_inputs], [state, *views])
    brush_sub.click(on_brush(False), [state, brush, *edits_inputs], [state, *views])
    brush_load.click(lambda st, *e: brush_value(st.overlay(_edits(e))), [state, *edits_inputs], [brush])

    def on_batch(st: SegmentState, folder, out, which, *edits, progress=gr.Progress()):  # noqa: B008
        try:
            chosen = Template.largest_object() if which == LARGEST else Template.from_state(st)
            report = segment_folder(
                Path(folder.strip()), Path(out.strip()), chosen, SEGMENTER,
                _edits(edits), int(edits[6]),
                lambda i, n, name: progress((i, n), desc=name),
            )  # fmt: skip
        except ValueError as e:
            return [["(batch)", f"not run: {e}"]]
        return [list(row) for row in report]

    batch_run.click(on_batch, [state, batch_in, batch_out, template, *edits_inputs], [batch_report])


def brush_canvas(elem_id: str) -> gr.components.Component:
    """The canvas the Brush paints on. gradio 3 (A1111): an Image with the sketch tool. gradio 4 (Forge)
    dropped `tool`: an ImageEditor with one RGBA layer, a brush and an eraser, no crop, and no upload
    (the preview is loaded into it), so it opens on the brush."""
    if GRADIO_4:
        return gr.ImageEditor(
            label="Paint here", type="numpy", image_mode="RGBA", sources=[], transforms=[],
            layers=False, brush=gr.Brush(colors=["rgb(255, 0, 200)"], color_mode="fixed"),
            interactive=True, elem_id=elem_id,
        )  # fmt: skip
    return gr.Image(label="Paint here", tool="sketch", type="numpy", source="upload", interactive=True,
                    elem_id=elem_id)  # fmt: skip


def brush_value(image: Image.Image | None) -> Image.Image | dict[str, Any] | None:
    """`image` as a value of the brush canvas: the image itself (gradio 3), or an ImageEditor value with it
    as background and nothing painted yet (gradio 4)."""
    if image is None or not GRADIO_4:
        return image
    return {"background": image, "layers": [], "composite": None}


def strokes_mask(value: Any) -> np.ndarray | None:
    """The painted pixels of the brush canvas's value (type numpy) as a boolean HxW mask; None when
    nothing is painted. gradio 3, Image(tool="sketch"): {"image": HxWx3, "mask": HxWx3}, the canvas's
    alpha made grey, so painted pixels are white. gradio 4, ImageEditor: {"background": ..., "layers":
    [HxWx4 RGBA, ...], "composite": ...}, a painted pixel has alpha > 0 in some layer."""
    if not isinstance(value, dict):
        return None
    planes = (value["layers"] or []) if "layers" in value else [value.get("mask")]
    painted = [_painted(np.asarray(plane)) for plane in planes if plane is not None]
    if not painted:
        return None
    mask = np.logical_or.reduce(painted)  # the layers all have the canvas's size
    return mask if mask.any() else None


def apply_strokes(st: SegmentState, value: Any, add: bool) -> str | None:
    """Add the strokes painted on the brush canvas to the mask (or take them out); why not, or None."""
    if st.image is None:
        return "no photo to paint on: upload one above first."
    strokes = strokes_mask(value)
    if strokes is None:
        return f"no brush strokes: press '{LOAD_PREVIEW}', then paint over the garment."
    if "background" in value and value["background"] is None:  # gradio 4: painted before loading
        return f"the strokes are on a blank canvas: press '{LOAD_PREVIEW}' and paint over it."
    (h, w), (sh, sw) = st.image.shape[:2], strokes.shape
    if abs(sh * w - sw * h) > w + h:  # another shape; the same shape at another scale is rescaled
        return f"the brush canvas is {sw}x{sh}, the photo {w}x{h}: press '{LOAD_PREVIEW}' and paint again."
    st.paint(strokes, add)
    return None


def _painted(plane: np.ndarray) -> np.ndarray:
    """Painted pixels of one canvas plane: alpha > 0 (RGBA), any channel > 0 (RGB, grey)."""
    if plane.ndim == 3:
        plane = plane[..., 3] if plane.shape[2] == 4 else plane.max(axis=2)
    return plane > 0


def _edits(values) -> MaskEdits:
    return MaskEdits(int(values[0]), int(values[1]), *values[2:5])


def _choices(sam_dirs: Callable[[], list[Path]]) -> list[str]:
    return [GRABCUT, *find_sam_files(sam_dirs())]


def _status(engine: str | None = None) -> str:
    engine = engine or SEGMENTER.engine
    hint = f" — {SAM_HINT}" if engine == GRABCUT else ""
    return f"Mask made by **{engine}**{hint}"
