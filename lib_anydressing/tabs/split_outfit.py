"""The Segment tab's 'Split outfit': the photo's garments found by the clothes parser, each cut out with its
category, and sent all at once to the garment slots of txt2img or img2img (slot i: garment i)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr
from PIL import Image

from ..segment.outfit import OutfitPiece, split_outfit
from ..segment.parser import GarmentParser, ParserError
from ..segment.session import SegmentState
from .gradio_compat import js_argument
from .tab_switch import switch_tab_js

ParserSource = Callable[[], GarmentParser]  # raises ParserError saying what to install


@dataclass
class OutfitTarget:
    """The garment slots of one WebUI tab: their image and category components, and the tab switch."""

    label: str
    images: list[Any]
    categories: list[Any]
    switch_js: str = ""


def build(state: gr.State, parser: ParserSource, targets: list[OutfitTarget]) -> None:
    """The panel's components and events, inside the Segment tab; `state` holds the tab's photo."""
    pieces = gr.State([])
    with gr.Accordion("Split outfit: every garment of the photo at once (clothes parser)", open=False):
        with gr.Row():
            split = gr.Button("Split outfit", elem_id="anydressing_split_outfit")
            if targets:
                target = gr.Dropdown([t.label for t in targets], value=targets[0].label, label="Send all to",
                                     elem_id="anydressing_split_target")  # fmt: skip
                send = gr.Button("Send all to the garment slots", elem_id="anydressing_split_send")
        gallery = gr.Gallery(label="Garments found", columns=4, height="auto", elem_id="anydressing_outfit_gallery")
        status = gr.Markdown(elem_id="anydressing_split_status")
    handlers = SplitHandlers(parser, targets)
    split.click(handlers.split, [state], [pieces, gallery, status])
    if targets:
        outputs = [c for t in targets for c in (*t.images, *t.categories)]
        send.click(handlers.send, [pieces, target], [*outputs, status]).then(
            None, [target], None, **js_argument(switch_tab_js({t.label: t.switch_js for t in targets}))
        )


class SplitHandlers:
    def __init__(self, parser: ParserSource, targets: list[OutfitTarget]) -> None:
        self.parser = parser
        self.targets = targets

    def split(self, st: SegmentState) -> tuple[list[OutfitPiece], list[tuple[Image.Image, str]], str]:
        if st.image is None:
            return [], [], "⚠ Upload a photo above first."
        photo = Image.fromarray(st.image)
        try:
            found = split_outfit(photo, self.parser().parts(photo))
        except ParserError as e:
            return [], [], f"⚠ {e}"
        if not found:
            return [], [], "⚠ No garment found on this photo (no person, or the parser saw no clothes)."
        shown = [(piece.cutout, f"{i + 1}: {piece.category}") for i, piece in enumerate(found)]
        return found, shown, f"{len(found)} garments: " + ", ".join(p.category for p in found)

    def send(self, pieces: list[OutfitPiece], label: str) -> list[Any]:
        """Slot i of the chosen tab gets piece i and its category; its slots beyond the pieces are emptied, so
        the slots hold this outfit only. The other tab's slots stay as they are."""
        updates: list[Any] = []
        note = "⚠ Split an outfit first." if not pieces else ""
        for target in self.targets:
            n = len(target.images)
            if target.label != label or not pieces:
                updates += [gr.update()] * (2 * n)
                continue
            chosen = pieces[:n]
            updates += [p.cutout for p in chosen] + [None] * (n - len(chosen))
            updates += [gr.update(value=p.category) for p in chosen] + [gr.update()] * (n - len(chosen))
            left = f" ({len(pieces) - n} left out: {n} slots)" if len(pieces) > n else ""
            note = f"Sent {len(chosen)} garments to {label}{left}."
        return [*updates, note]
