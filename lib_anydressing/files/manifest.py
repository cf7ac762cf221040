"""Training samples for AnyDressing: a folder with a JSONL manifest, loaded as a torch Dataset.

Format: a file `manifest.jsonl` (any name), one JSON object per line, paths relative to the
manifest's folder:

    {"id": "0001", "person": "person/0001.jpg", "caption": "a woman in a red blouse and jeans",
     "garments": [{"image": "garments/0001_upper.png", "mask": "masks/0001_upper.png", "category": "upper"},
                  {"image": "garments/0001_lower.png", "mask": "masks/0001_lower.png", "category": "lower"}]}

- `person`: the target photo (any PIL mode: RGBA is put on white, CMYK and 16-bit are converted).
- `garments[k].image`: the garment laid flat or cut out (alpha -> white backdrop), any size.
- `garments[k].mask`: where garment k is in the person photo, the same size as the person photo;
  white (or opaque alpha) = garment. Thresholded at half.
- `garments[k].category`: one of the dataset's slot names (default: the UI's garment categories);
  it picks the garment's GFE LoRA slot.
- `caption`: the prompt (may be empty); `id`: unique, defaults to the line number.
Blank lines and lines starting with `#` are ignored.

A sample that cannot be used (a missing or corrupt file, a mask of another size than its photo, no
garments, an unknown category...) is skipped and counted in `DressingDataset.report` with the reason,
never raised mid-training: cheap checks (files exist, headers, sizes) run when the dataset is opened,
and a sample whose pixels fail to decode later is replaced by the next usable one. Such late skips
are logged; with DataLoader workers they are counted in the worker's copy of the report, not the
main process's.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from ..garments import CATEGORIES
from .images import ImageInputError, canny_edges, garment_tensor, to_rgb_and_mask

log = logging.getLogger(__name__)

MIN_SIDE = 8  # smaller images hold nothing to learn from once scaled up; they are skipped
Entry = TypeVar("Entry")


class SampleError(Exception):
    """Why one sample cannot be used (the message is the reason that gets counted)."""


@dataclass
class SkipReport:
    """What was skipped and why: counts per reason plus the first few sample ids for each."""

    total: int = 0
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    def skip(self, sample_id: str, reason: str) -> None:
        self.counts[reason] += 1
        ids = self.examples.setdefault(reason, [])
        if len(ids) < self.max_examples:
            ids.append(sample_id)

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        lines = [f"{self.total - self.skipped} of {self.total} samples usable, {self.skipped} skipped"]
        for reason, n in self.counts.most_common():
            lines.append(f"  {n} x {reason} (e.g. {', '.join(self.examples[reason])})")
        return "\n".join(lines)


@dataclass(frozen=True)
class GarmentEntry:
    image: Path
    mask: Path
    category: str


@dataclass(frozen=True)
class SampleEntry:
    id: str
    person: Path
    caption: str
    garments: tuple[GarmentEntry, ...]


def open_image(path: Path) -> Image.Image:
    """Decode an image file fully, turning every failure into a SampleError with a short reason."""
    if not path.is_file():
        raise SampleError("missing file")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()  # the file closes on leaving the block
    except Image.DecompressionBombError as e:
        raise SampleError("image too large") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise SampleError("corrupt image") from e


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header only (cheap: used to check a whole manifest on opening)."""
    if not path.is_file():
        raise SampleError("missing file")
    try:
        with Image.open(path) as image:
            size = image.size
    except Image.DecompressionBombError as e:
        raise SampleError("image too large") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise SampleError("corrupt image") from e
    if min(size) < MIN_SIDE:
        raise SampleError(f"image smaller than {MIN_SIDE} px")
    return size


def mask_array(image: Image.Image) -> np.ndarray:
    """A mask file as (H, W) float32 in [0, 1]: its alpha when it has one, else its gray level."""
    rgb, alpha = to_rgb_and_mask(image)
    gray = alpha if alpha is not None else rgb.convert("L")
    return np.asarray(gray, dtype=np.float32) / 255.0


def parse_line(line: str, number: int, root: Path) -> SampleEntry:
    """One manifest line -> SampleEntry (paths resolved against the manifest's folder)."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as e:
        raise SampleError("manifest line is not JSON") from e
    if not isinstance(data, dict) or not isinstance(data.get("person"), str):
        raise SampleError("manifest line has no 'person' path")
    garments = data.get("garments") or []
    if not isinstance(garments, list) or not garments:
        raise SampleError("no garments")
    entries = []
    for g in garments:
        if not (isinstance(g, dict) and isinstance(g.get("image"), str) and isinstance(g.get("mask"), str)):
            raise SampleError("garment without 'image' and 'mask' paths")
        entries.append(GarmentEntry(root / g["image"], root / g["mask"], str(g.get("category", "other"))))
    caption = data.get("caption") or ""
    if not isinstance(caption, str):
        raise SampleError("caption is not a string")
    return SampleEntry(str(data.get("id", number)), root / data["person"], caption, tuple(entries))


def read_manifest(
    path: Path, parse: Callable[[str, int, Path], Entry] = parse_line
) -> list[tuple[str, Entry | SampleError]]:
    """Every sample line of a JSONL manifest, parsed by `parse(line, number, folder)` (raising SampleError)
    or with the reason it cannot be; blank and `#` lines skipped. The evaluation reads its cases with it too."""
    out: list[tuple[str, Entry | SampleError]] = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            out.append((str(number), parse(line, number, Path(path).parent)))
        except SampleError as e:
            out.append((f"line {number}", e))
    return out


def cover(image: Image.Image, size: tuple[int, int], resample: Image.Resampling) -> Image.Image:
    """Scale to cover (height, width) and crop the centre: the person keeps its proportions, no padding."""
    return ImageOps.fit(image, (size[1], size[0]), method=resample, centering=(0.5, 0.5))


class DressingDataset(Dataset):
    """Samples of a JSONL manifest as the per-sample dict the trainer consumes.

    Each item: "person" (3, H, W) in [-1, 1]; "garments" (N, 3, h, w) in [-1, 1] (each garment fitted
    into the garment canvas keeping its aspect, padded white); "masks" (N, H, W) in {0, 1} (garment k's
    region in the person image, cropped and scaled like the person); "edges" (H, W) in {0, 1} (the person's
    Canny edges, GTL's fixed M'_k factor: computed once here, not at every step); "slots" (N,) long (index of
    the garment's category in `slot_names`); "caption" str; "id" str. Sizes are (height, width).
    """

    def __init__(
        self,
        manifest: Path | str,
        size: tuple[int, int] = (768, 576),
        garment_size: tuple[int, int] | None = None,
        slot_names: Sequence[str] = CATEGORIES,
        max_garments: int | None = None,
    ) -> None:
        self.manifest = Path(manifest)
        self.size = tuple(size)
        self.garment_size = tuple(garment_size or size)
        self.slot_names = list(slot_names)
        self.max_garments = max_garments
        self.report = SkipReport()
        self.samples: list[SampleEntry] = []
        self._failed: set[int] = set()  # indices whose pixels failed to decode (in this process)
        for line_id, parsed in read_manifest(self.manifest):
            self.report.total += 1
            try:
                if isinstance(parsed, SampleError):
                    raise parsed
                self.check(parsed)
            except SampleError as e:
                self.report.skip(parsed.id if isinstance(parsed, SampleEntry) else line_id, str(e))
                continue
            self.samples.append(parsed)
        if not self.samples:
            raise ValueError(f"no usable sample in {self.manifest}:\n{self.report.summary()}")

    def check(self, entry: SampleEntry) -> None:
        """The cheap checks (no pixel decoding): raise SampleError with the reason to skip."""
        if self.max_garments is not None and len(entry.garments) > self.max_garments:
            raise SampleError(f"more than {self.max_garments} garments")
        for g in entry.garments:
            if g.category not in self.slot_names:
                raise SampleError(f"category '{g.category}' is not a slot name")
        person_size = image_size(entry.person)
        for g in entry.garments:
            image_size(g.image)
            if image_size(g.mask) != person_size:
                raise SampleError("mask size differs from the person image")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The sample, or the next usable one when its files fail to decode (counted in `report`)."""
        for step in range(len(self.samples)):
            i = (index + step) % len(self.samples)
            if i in self._failed:
                continue
            try:
                return self.load(self.samples[i])
            except SampleError as e:
                self._failed.add(i)
                self.report.skip(self.samples[i].id, str(e))
                log.warning("skipping training sample %s: %s", self.samples[i].id, e)
        raise RuntimeError(f"no sample of {self.manifest} can be decoded:\n{self.report.summary()}")

    def load(self, entry: SampleEntry) -> dict[str, Any]:
        try:
            person_rgb, _ = to_rgb_and_mask(open_image(entry.person))
            person = cover(person_rgb, self.size, Image.Resampling.LANCZOS)
            garments, masks = [], []
            gh, gw = self.garment_size
            for g in entry.garments:
                garments.append(garment_tensor(open_image(g.image), (gw, gh))[0])
                raw = mask_array(open_image(g.mask))
                if raw.shape != (person_rgb.height, person_rgb.width):
                    raise SampleError("mask size differs from the person image")
                mask_image = Image.fromarray((raw * 255).round().astype(np.uint8), "L")
                m = np.asarray(cover(mask_image, self.size, Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
                if not (m >= 0.5).any():
                    raise SampleError("garment mask is empty")
                masks.append(torch.from_numpy((m >= 0.5).astype(np.float32)))
        except ImageInputError as e:
            raise SampleError(str(e)) from e
        x = torch.from_numpy(np.asarray(person, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        return {
            "person": x.contiguous(),
            "garments": torch.stack(garments),
            "masks": torch.stack(masks),
            "edges": canny_edges(x[None])[0, 0],
            "slots": torch.tensor([self.slot_names.index(g.category) for g in entry.garments], dtype=torch.long),
            "caption": entry.caption,
            "id": entry.id,
        }
