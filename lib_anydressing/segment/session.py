"""The state of one segmentation in the UI: the image, the prompts, the last SAM logits, the mask edits.

Kept free of gradio so every UI action is a plain function of this state, tested directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from . import mask_tools as mt
from .outputs import cutout, square_on_white
from .segmenter import Result, Segmenter

POSITIVE, NEGATIVE, BOX = "positive point", "negative point", "box (two clicks)"


@dataclass
class MaskEdits:
    grow: int = 0  # pixels: > 0 dilates, < 0 erodes
    feather: int = 0
    fill_holes: bool = False
    largest_only: bool = False
    invert: bool = False


@dataclass
class SegmentState:
    image: np.ndarray | None = None
    points: list[tuple[float, float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    box: tuple[float, float, float, float] | None = None
    pending_corner: tuple[float, float] | None = None
    history: list[str] = field(default_factory=list)  # "point" / "box": what undo takes back
    result: Result | None = None
    choice: int | None = None  # a candidate chosen by the user instead of the best
    added: np.ndarray | None = None  # brush strokes forced into / out of the mask, over everything else
    removed: np.ndarray | None = None

    def set_image(self, image: np.ndarray | None) -> None:
        self.__init__()
        self.image = image

    def click(self, x: float, y: float, mode: str) -> None:
        if mode == BOX:
            if self.pending_corner is None:
                self.pending_corner = (x, y)
                return
            (x0, y0), self.pending_corner = self.pending_corner, None
            self.box = (min(x0, x), min(y0, y), max(x0, x), max(y0, y))
            self.history.append("box")
        else:
            self.points.append((x, y))
            self.labels.append(0 if mode == NEGATIVE else 1)
            self.history.append("point")
        self.choice = None

    def undo(self) -> None:
        if self.pending_corner is not None:
            self.pending_corner = None
        elif self.history:
            if self.history.pop() == "box":
                self.box = None
            else:
                self.points.pop()
                self.labels.pop()
        self.choice = None

    def clear(self) -> None:
        self.set_image(self.image)

    def run(self, segmenter: Segmenter) -> Result | None:
        """Segment with the current prompts, refining SAM's previous best mask when there is one."""
        if self.image is None:
            return None
        previous = None
        if self.result is not None and self.result.candidates is not None and self.points:
            previous = self.result.candidates.low_res_logits[self.result.candidates.best]
        self.result = segmenter.segment(self.image, self.points, self.labels, self.box, previous)
        return self.result

    def paint(self, strokes: np.ndarray, add: bool) -> None:
        """Brush strokes (any size: scaled to the photo) added to or taken out of the mask for good."""
        if self.image is None:
            return
        h, w = self.image.shape[:2]
        if strokes.shape != (h, w):
            strokes = np.asarray(Image.fromarray(strokes.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 0
        empty = np.zeros((h, w), dtype=bool)
        if add:
            self.added = mt.paint(empty if self.added is None else self.added, strokes, add=True)
            self.removed = None if self.removed is None else mt.paint(self.removed, strokes, add=False)
        else:
            self.removed = mt.paint(empty if self.removed is None else self.removed, strokes, add=True)
            self.added = None if self.added is None else mt.paint(self.added, strokes, add=False)

    def mask(self, edits: MaskEdits) -> np.ndarray | None:
        """The chosen candidate (or the best), after the edits and the brush; float alpha when feathered."""
        if self.result is None and self.added is None:
            return None
        raw = self.result.mask if self.result is not None else np.zeros(self.image.shape[:2], dtype=bool)
        if self.choice is not None and self.result.candidates is not None:
            raw = self.result.candidates.masks[self.choice]
        m = mt.grow(raw, edits.grow)
        if edits.fill_holes:
            m = mt.fill_holes(m)
        if edits.largest_only:
            m = mt.largest_component(m)
        if edits.invert:
            m = mt.invert(m)
        if self.added is not None:
            m = mt.paint(m, self.added, add=True)
        if self.removed is not None:
            m = mt.paint(m, self.removed, add=False)
        return mt.feather(m, edits.feather) if edits.feather > 0 else m

    def overlay(self, edits: MaskEdits) -> Image.Image | None:
        """The image with the mask tinted, the points (green +, red -) and the box drawn."""
        if self.image is None:
            return None
        shown = self.image.astype(np.float32)
        mask = self.mask(edits)
        if mask is not None:
            alpha = mask.astype(np.float32)[..., None] * 0.45
            shown = shown * (1 - alpha) + np.array([40, 120, 255], np.float32) * alpha
        picture = Image.fromarray(shown.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(picture)
        r = max(3, min(picture.size) // 80)
        for (x, y), label in zip(self.points, self.labels, strict=True):
            draw.ellipse((x - r, y - r, x + r, y + r), fill=(0, 200, 0) if label else (230, 0, 0), outline="white")
        if self.box is not None:
            draw.rectangle(self.box, outline=(255, 200, 0), width=max(2, r // 2))
        if self.pending_corner is not None:
            x, y = self.pending_corner
            draw.line((x - 2 * r, y, x + 2 * r, y), fill=(255, 200, 0), width=2)
            draw.line((x, y - 2 * r, x, y + 2 * r), fill=(255, 200, 0), width=2)
        return picture

    def outputs(self, edits: MaskEdits, square_size: int) -> tuple[Image.Image, Image.Image, Image.Image] | None:
        """(RGBA cutout cropped to the mask, the mask as an L image, the garment on a white square)."""
        mask = self.mask(edits)
        if self.image is None or mask is None or not mask.any():
            return None
        rgba = cutout(self.image, mask)
        mask_image = Image.fromarray((np.clip(mask.astype(np.float32), 0, 1) * 255).astype(np.uint8), "L")
        return rgba, mask_image, square_on_white(rgba, square_size)
