"""'Segment garment': click on a garment, get its cutout. The tab's gradio side; the logic is in segment/.

The components are in segment_tab_layout.py; here are the handlers (SegmentHandlers), the one place that
wires them to the components (`_wire`), and the Brush's values across gradio 3 and 4.
No `from __future__ import annotations` here: gradio finds the `gr.SelectData` parameter by its annotation.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import gradio as gr
import numpy as np
from PIL import Image

from ..files.images import ImageInputError
from ..segment.batch import Template, segment_folder
from ..segment.outputs import free_path
from ..segment.parser import EXTENSION_PARSER_DIR, PARSERS, GarmentParser
from ..segment.sam_models import SamModelError, find_sam_files
from ..segment.segmenter import GRABCUT, SAM_HINT, Segmenter, as_rgb_array, engine_choices
from ..segment.session import MaskEdits, SegmentState
from . import split_outfit
from .gradio_compat import GRADIO_4, js_argument
from .segment_tab_layout import LARGEST, LOAD_PREVIEW, SegmentLayout, segment_layout
from .tab_switch import switch_tab_js

SEGMENTER = Segmenter()  # one SAM model per process, freed on request
Views = tuple[Any, ...]  # the values of SegmentLayout.views, in its order


@dataclass
class SendTarget:
    """Somewhere a cutout can go: garment slot images (one component) or an inpaint pair (photo, mask)."""

    label: str
    components: list[Any]
    switch_js: str = ""  # the WebUI's own tab-switch call, e.g. "switch_to_txt2img()"


class Edits(NamedTuple):
    """The values of SegmentLayout.edit_inputs, which every handler gets after its own inputs."""

    grow: float
    feather: float
    fill_holes: bool
    largest_only: bool
    invert: bool
    choice: str  # "best" or a candidate's number
    square_size: int

    def mask(self) -> MaskEdits:
        return MaskEdits(int(self.grow), int(self.feather), self.fill_holes, self.largest_only, self.invert)


def build(
    sam_dirs: Callable[[], list[Path]],
    output_dir: Path,
    send_targets: list[SendTarget] = (),
    parser: split_outfit.ParserSource | None = None,
    outfit_targets: list[split_outfit.OutfitTarget] = (),
) -> None:
    """Components of the tab, inside the caller's Blocks/Tab context. `send_targets` and `outfit_targets`
    come from the WebUI (garment slots, inpaint upload); standalone there are none and no Send control.
    `parser`: the clothes parser for Split outfit (default: the extension's models/parser or the HF cache)."""
    ui = segment_layout(engine_choices(sam_dirs()), _status(), output_dir / "batch", [t.label for t in send_targets])
    _wire(ui, SegmentHandlers(sam_dirs, output_dir, list(send_targets)))
    split_outfit.build(ui.state, parser or _standalone_parser, list(outfit_targets))


def _standalone_parser() -> GarmentParser:
    return PARSERS.get([EXTENSION_PARSER_DIR])


def _wire(ui: SegmentLayout, on: "SegmentHandlers") -> None:
    """Every event of the tab. Handlers that change the session state get it and give it back first."""
    p, b, o, edits = ui.prompts, ui.brush, ui.outputs, ui.edit_inputs
    state, views = ui.state, ui.views
    p.photo.upload(on.upload, [state, p.photo, *edits], [state, *views])
    p.photo.select(on.click, [state, p.mode, *edits], [state, *views])
    p.undo.click(on.undo, [state, *edits], [state, *views])
    p.clear.click(on.clear, [state, *edits], [state, *views])
    p.model.change(on.change_model, [state, p.model, p.device, *edits], [state, *views])
    p.device.change(on.change_model, [state, p.model, p.device, *edits], [state, *views])
    p.refresh.click(on.refresh_models, outputs=[p.model])
    p.free.click(on.free_model, outputs=[p.model, p.status])
    for component in edits:
        component.change(on.rerender, [state, *edits], views)
    o.save.click(on.save, [state, *edits], [o.saved])
    o.to_dataset.click(on.add_to_dataset, [state, *edits], [o.saved])
    if ui.send is not None:
        targets = [c for t in on.send_targets for c in t.components]
        ui.send.send.click(on.send, [state, ui.send.target, *edits], targets).then(
            None, [ui.send.target], None, **js_argument(switch_tab_js({t.label: t.switch_js for t in on.send_targets}))
        )
    b.add.click(on.paint_add, [state, b.canvas, *edits], [state, *views])
    b.subtract.click(on.paint_subtract, [state, b.canvas, *edits], [state, *views])
    b.load.click(on.load_brush, [state, *edits], [b.canvas])
    batch = ui.batch
    batch.run.click(on.run_batch, [state, batch.folder, batch.out, batch.template, *edits], [batch.report])


class SegmentHandlers:
    """The tab's event handlers, gradio functions taking the inputs' values positionally (see `_wire`):
    their own inputs, then `*edits`, the values of SegmentLayout.edit_inputs (read as Edits)."""

    def __init__(self, sam_dirs: Callable[[], list[Path]], output_dir: Path, send_targets: list[SendTarget]) -> None:
        self.sam_dirs = sam_dirs
        self.output_dir = output_dir
        self.send_targets = send_targets

    def upload(self, st: SegmentState, image: Image.Image | None, *edits: Any) -> tuple:
        try:
            st.set_image(None if image is None else as_rgb_array(image))
        except ImageInputError as e:
            st.set_image(None)
            return self._shown(st, edits, problem=str(e))
        return self._shown(st, edits)

    def click(self, st: SegmentState, click_mode: str, evt: gr.SelectData, *edits: Any) -> tuple:
        if st.image is not None:
            st.click(float(evt.index[0]), float(evt.index[1]), click_mode)
            st.run(SEGMENTER)
        return self._shown(st, edits)

    def undo(self, st: SegmentState, *edits: Any) -> tuple:
        return self._change_prompts(st, st.undo, edits)

    def clear(self, st: SegmentState, *edits: Any) -> tuple:
        return self._change_prompts(st, st.clear, edits)

    def change_model(self, st: SegmentState, name: str, device: str, *edits: Any) -> tuple:
        """Load the chosen model (GrabCut on failure, saying why) and segment the same prompts again."""
        try:
            SEGMENTER.load(None if name == GRABCUT else find_sam_files(self.sam_dirs()).get(name), device)
        except (SamModelError, RuntimeError) as e:
            SEGMENTER.load(None)
            return self._shown(st, edits, problem=f"{e}. Using {GRABCUT}.")
        if st.points or st.box:
            st.result = None
            st.run(SEGMENTER)
        return self._shown(st, edits)

    def refresh_models(self) -> dict[str, Any]:
        return gr.update(choices=engine_choices(self.sam_dirs()))

    def free_model(self) -> tuple[dict[str, Any], str]:
        SEGMENTER.free()
        return gr.update(value=GRABCUT), _status()

    def rerender(self, st: SegmentState, *edits: Any) -> Views:
        return _render(st, Edits(*edits))

    def paint_add(self, st: SegmentState, painted: Any, *edits: Any) -> tuple:
        return self._shown(st, edits, problem=apply_strokes(st, painted, add=True))

    def paint_subtract(self, st: SegmentState, painted: Any, *edits: Any) -> tuple:
        return self._shown(st, edits, problem=apply_strokes(st, painted, add=False))

    def load_brush(self, st: SegmentState, *edits: Any) -> Image.Image | dict[str, Any] | None:
        return brush_value(st.overlay(Edits(*edits).mask()))

    def save(self, st: SegmentState, *edits: Any) -> str:
        """The three results into the output folder, under names that are free."""
        outs = _results(st, Edits(*edits))
        if outs is None:
            return "Nothing to save yet: click on the garment first."
        names = []
        for image, stem in zip(outs, ("garment-cutout", "garment-mask", "garment-square"), strict=True):
            path = free_path(self.output_dir, stem)
            image.save(path)
            names.append(path.name)
        return f"Saved to {self.output_dir}: " + ", ".join(names)

    def add_to_dataset(self, st: SegmentState, *edits: Any) -> str:
        """The RGBA cutout where the LoRA tab imports from: its alpha lets training mask the loss to the garment."""
        outs = _results(st, Edits(*edits))
        if outs is None:
            return "Nothing to add yet: click on the garment first."
        path = free_path(self.output_dir / "lora_dataset", "garment")
        outs[0].save(path)
        return f"Added {path.name} to {path.parent}"

    def send(self, st: SegmentState, label: str, *edits: Any) -> list[Any]:
        """Values for every send target's components: the chosen target gets the cutout (a garment slot) or
        the whole photo and the mask (an inpaint pair); the others stay as they are."""
        outs = _results(st, Edits(*edits))
        updates: list[Any] = [gr.update() for t in self.send_targets for _ in t.components]
        if outs is None:
            return updates
        start = 0
        for target in self.send_targets:
            if target.label == label:
                values = [outs[0]] if len(target.components) == 1 else [Image.fromarray(st.image), outs[1]]
                updates[start : start + len(values)] = values
            start += len(target.components)
        return updates

    def run_batch(
        self,
        st: SegmentState,
        folder: str,
        out: str,
        which: str,
        *edits: Any,
        progress: gr.Progress = gr.Progress(),  # noqa: B008
    ) -> list[list[str]]:
        """The folder's photos segmented with the largest object or this photo's prompts; a row per file."""
        e = Edits(*edits)
        try:
            chosen = Template.largest_object() if which == LARGEST else Template.from_state(st)
            report = segment_folder(
                Path(folder.strip()), Path(out.strip()), chosen, SEGMENTER, e.mask(), int(e.square_size),
                lambda i, n, name: progress((i, n), desc=name),
            )  # fmt: skip
        except ValueError as error:
            return [["(batch)", f"not run: {error}"]]
        return [list(row) for row in report]

    def _change_prompts(self, st: SegmentState, change: Callable[[], None], edits: Sequence[Any]) -> tuple:
        """Undo or clear, then segment what prompts are left (no mask when none are)."""
        change()
        if st.points or st.box:
            st.run(SEGMENTER)
        else:
            st.result = None
        return self._shown(st, edits)

    def _shown(self, st: SegmentState, edits: Sequence[Any], problem: str | None = None) -> tuple:
        """The state and its views; `problem`, when given, is shown instead of the status line."""
        views = _render(st, Edits(*edits))
        return (st, *views) if problem is None else (st, *views[:-1], f"⚠ {problem}")


def _render(st: SegmentState, edits: Edits) -> Views:
    """The views of `st` with `edits` applied; also records the chosen candidate in `st` for the outputs."""
    st.choice = None if edits.choice == "best" else int(edits.choice) - 1
    mask_edits = edits.mask()
    outs = st.outputs(mask_edits, int(edits.square_size))
    engine = st.result.engine if st.result is not None else SEGMENTER.engine
    return (st.overlay(mask_edits), _candidates(st), *(outs or (None, None, None)), _status(engine))


def _candidates(st: SegmentState) -> list[tuple[Image.Image, str]]:
    """SAM's candidate masks with their scores, for the gallery; none from GrabCut."""
    if st.result is None or st.result.candidates is None:
        return []
    c = st.result.candidates
    return [(Image.fromarray(m.astype(np.uint8) * 255), f"{i + 1}: score {s:.2f}")
            for i, (m, s) in enumerate(zip(c.masks, c.scores, strict=True))]  # fmt: skip


def _results(st: SegmentState, edits: Edits) -> tuple[Image.Image, Image.Image, Image.Image] | None:
    """Cutout, mask and garment on white, with the candidate chosen when the views were last shown."""
    return st.outputs(edits.mask(), int(edits.square_size))


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


def _status(engine: str | None = None) -> str:
    engine = engine or SEGMENTER.engine
    hint = f" — {SAM_HINT}" if engine == GRABCUT else ""
    return f"Mask made by **{engine}**{hint}"
