"""A folder of photos -> masks and cutouts, with one prompt template; a bad file is reported, never fatal."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..files.images import IMAGE_SUFFIXES, ImageInputError
from . import mask_tools as mt
from .segmenter import Segmenter, as_rgb_array
from .session import MaskEdits, SegmentState


@dataclass
class Template:
    """Prompts as fractions of the image, so one template fits photos of any size."""

    points: list[tuple[float, float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    box: tuple[float, float, float, float] | None = None
    largest_only: bool = False

    @classmethod
    def largest_object(cls) -> Template:
        """No prompt from the user: the object filling most of a slightly inset box, largest part kept."""
        return cls(box=(0.03, 0.03, 0.97, 0.97), largest_only=True)

    @classmethod
    def from_state(cls, state: SegmentState) -> Template:
        """The prompts clicked on the current photo, made relative to its size."""
        if state.image is None or not (state.points or state.box):
            raise ValueError("click on a photo first: its prompts become the template")
        h, w = state.image.shape[:2]
        box = None if state.box is None else (state.box[0] / w, state.box[1] / h, state.box[2] / w, state.box[3] / h)
        return cls([(x / w, y / h) for x, y in state.points], list(state.labels), box)

    def on(self, w: int, h: int) -> tuple[list[tuple[float, float]], list[int], tuple | None]:
        box = None if self.box is None else (self.box[0] * w, self.box[1] * h, self.box[2] * w, self.box[3] * h)
        return [(x * w, y * h) for x, y in self.points], list(self.labels), box


def segment_folder(
    folder: Path,
    out_dir: Path,
    template: Template,
    segmenter: Segmenter,
    edits: MaskEdits,
    square_size: int = 512,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[tuple[str, str]]:
    """(file name, 'saved ...' or the reason it was skipped) for every file of `folder`."""
    if not folder.is_dir():
        raise ValueError(f"'{folder}' is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    report: list[tuple[str, str]] = []
    for i, path in enumerate(files):
        if progress is not None:
            progress(i, len(files), path.name)
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            report.append((path.name, "skipped: not an image file"))
            continue
        try:
            with Image.open(path) as opened:
                image = as_rgb_array(opened)
            state = SegmentState()
            state.set_image(image)
            state.points, state.labels, state.box = template.on(image.shape[1], image.shape[0])
            state.run(segmenter)
            if template.largest_only:
                state.result.mask = mt.largest_component(state.result.mask)
            outputs = state.outputs(edits, square_size)
            if outputs is None:
                report.append((path.name, "skipped: the mask is empty"))
                continue
            names = []
            for picture, kind in zip(outputs, ("cutout", "mask", "square"), strict=True):
                target = out_dir / f"{path.stem}-{kind}.png"
                out_dir.mkdir(parents=True, exist_ok=True)
                picture.save(target)
                names.append(target.name)
            report.append((path.name, "saved " + ", ".join(names)))
        except (UnidentifiedImageError, ImageInputError, OSError, ValueError) as e:
            report.append((path.name, f"skipped: {e}"))
    return report
