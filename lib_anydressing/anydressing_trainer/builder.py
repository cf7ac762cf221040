"""`python -m lib_anydressing build-dataset --in PHOTOS --out DATASET`: a folder of photos -> a training set.

Input convention (one flat folder; `<cat>` is a category such as upper or lower; images in any
format PIL reads: .png .jpg .jpeg .webp .bmp .tif .tiff):

    <id>.jpg               the person photo
    <id>_<cat>.png         a garment worn in it (laid flat, or a cutout on the photo's canvas)
    <id>_<cat>_mask.png    optional: that garment's mask in the photo (same size as the photo)
    <id>_<cat>.json        optional: where the garment is in the photo, for the segmenter, in photo
                           pixels: {"box": [x0, y0, x1, y1], "points": [[x, y], ...], "labels": [1, 0, ...]}
    <id>.txt               optional: the caption

Each garment's mask comes from the first of: its mask file; its own alpha when the garment image is a
cutout the size of the photo (already placed on it); the segmenter prompted by its .json (SAM when a
checkpoint is given with --sam, else GrabCut). A sample with a garment whose mask cannot be found
this way is skipped (it would teach the model a garment it was not shown), like a sample whose
files do not decode, a mask of another size than the photo, or an empty mask. The output folder
holds person/, garments/, masks/ and manifest.jsonl in the format of `training.dataset`; photos and
garments are copied byte for byte, masks are written as 8-bit PNGs (0 or 255).
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..files.images import IMAGE_SUFFIXES, ImageInputError, to_rgb_and_mask
from ..files.manifest import MIN_SIDE, SampleError, SkipReport, mask_array, open_image
from ..garments import CATEGORIES
from ..segment.sam_models import SamModelError
from ..segment.segmenter import Segmenter, as_rgb_array

MANIFEST = "manifest.jsonl"


@dataclass
class GarmentFiles:
    image: Path | None = None
    mask: Path | None = None
    prompts: Path | None = None


@dataclass
class SampleFiles:
    person: Path | None = None
    caption: Path | None = None
    garments: dict[str, GarmentFiles] = field(default_factory=dict)


@dataclass
class BuildResult:
    written: list[str]
    report: SkipReport
    mask_sources: Counter
    manifest: Path

    def summary(self) -> str:
        sources = ", ".join(f"{n} from {s}" for s, n in self.mask_sources.most_common()) or "none"
        return f"wrote {len(self.written)} samples to {self.manifest} (masks: {sources})\n{self.report.summary()}"


def classify(stem: str, suffix: str, categories: Sequence[str]) -> tuple[str, str | None, str]:
    """(sample id, category or None, role) of a file name: person, image, mask or prompts."""
    for c in categories:
        if suffix != ".json" and stem.endswith(f"_{c}_mask") and len(stem) > len(c) + 6:
            return stem[: -len(c) - 6], c, "mask"
        if stem.endswith(f"_{c}") and len(stem) > len(c) + 1:
            return stem[: -len(c) - 1], c, "prompts" if suffix == ".json" else "image"
    return stem, None, "person"


def scan(folder: Path, categories: Sequence[str]) -> dict[str, SampleFiles]:
    """Group the folder's files by sample id following the naming convention."""
    samples: dict[str, SampleFiles] = {}
    for path in sorted(folder.iterdir()):
        suffix = path.suffix.lower()
        if not path.is_file() or suffix not in (*IMAGE_SUFFIXES, ".json", ".txt"):
            continue
        if suffix == ".txt":
            samples.setdefault(path.stem, SampleFiles()).caption = path
            continue
        sid, cat, role = classify(path.stem, suffix, categories)
        if cat is None and suffix == ".json":
            continue
        sample = samples.setdefault(sid, SampleFiles())
        if cat is None:
            sample.person = path
        else:
            setattr(sample.garments.setdefault(cat, GarmentFiles()), role, path)
    return samples


def read_prompts(path: Path) -> tuple[list[tuple[float, float]], list[int], tuple[float, float, float, float] | None]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        box = tuple(float(v) for v in data["box"]) if data.get("box") is not None else None
        points = [(float(x), float(y)) for x, y in data.get("points", [])]
        labels = [int(v) for v in data.get("labels", [1] * len(points))]
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise SampleError("unreadable prompt JSON (want 'box' and/or 'points' with 'labels')") from e
    if (box is not None and len(box) != 4) or len(labels) != len(points) or (box is None and not points):
        raise SampleError("prompt JSON needs a box of 4 numbers and/or points with one label each")
    return points, labels, box


def garment_mask(files: GarmentFiles, cat: str, person: Image.Image, segmenter: Segmenter) -> tuple[np.ndarray, str]:
    """(H, W) bool mask of the garment in the person photo and where it came from."""
    size = person.size
    if files.mask is not None:
        image = open_image(files.mask)
        if image.size != size:
            raise SampleError("mask size differs from the person image")
        return mask_array(image) >= 0.5, "mask file"
    garment = open_image(files.image)
    if garment.size == size:
        _, alpha = to_rgb_and_mask(garment)
        if alpha is not None:
            return np.asarray(alpha) >= 128, "garment alpha"
    if files.prompts is not None:
        points, labels, box = read_prompts(files.prompts)
        result = segmenter.segment(as_rgb_array(person), points, labels, box)
        return result.mask, result.engine
    raise SampleError(f"no mask for '{cat}' (no mask file, no cutout on the photo's canvas, no prompt JSON)")


def build_dataset(
    source: Path, out: Path, categories: Sequence[str] = CATEGORIES, segmenter: Segmenter | None = None
) -> BuildResult:
    """Write the dataset; never stops on a bad sample (see the module docstring for the rules)."""
    source, out = Path(source), Path(out)
    for sub in ("person", "garments", "masks"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    segmenter = segmenter or Segmenter()
    report, sources, written, lines = SkipReport(), Counter(), [], []
    for sid, files in scan(source, categories).items():
        report.total += 1
        try:
            line, used = build_sample(sid, files, out, segmenter)
        except (SampleError, ImageInputError) as e:
            report.skip(sid, str(e))
            continue
        lines.append(json.dumps(line))
        sources.update(used)
        written.append(sid)
    manifest = out / MANIFEST
    manifest.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return BuildResult(written, report, sources, manifest)


def build_sample(sid: str, files: SampleFiles, out: Path, segmenter: Segmenter) -> tuple[dict, list[str]]:
    """Check one sample, write its files; raise SampleError before writing anything when it is unusable."""
    if files.person is None:
        raise SampleError("no person photo")
    garments = {c: g for c, g in files.garments.items() if g.image is not None}
    if not garments:
        raise SampleError("no garments")
    orphans = [c for c, g in files.garments.items() if g.image is None]
    if orphans:
        raise SampleError(f"mask or prompt files without a garment image ({', '.join(orphans)})")
    person = open_image(files.person)
    if min(person.size) < MIN_SIDE:
        raise SampleError(f"image smaller than {MIN_SIDE} px")
    masks, used = {}, []
    for cat, g in garments.items():
        garment = open_image(g.image)
        if min(garment.size) < MIN_SIDE:
            raise SampleError(f"image smaller than {MIN_SIDE} px")
        mask, source = garment_mask(g, cat, person, segmenter)
        if not mask.any():
            raise SampleError("garment mask is empty")
        masks[cat] = mask
        used.append(source)
    caption = files.caption.read_text(encoding="utf-8").strip() if files.caption is not None else ""
    person_name = f"person/{sid}{files.person.suffix.lower()}"
    shutil.copyfile(files.person, out / person_name)
    entries = []
    for (cat, g), source in zip(garments.items(), used, strict=True):
        image_name = f"garments/{sid}_{cat}{g.image.suffix.lower()}"
        mask_name = f"masks/{sid}_{cat}.png"
        shutil.copyfile(g.image, out / image_name)
        Image.fromarray(masks[cat].astype(np.uint8) * 255, "L").save(out / mask_name)
        entries.append({"image": image_name, "mask": mask_name, "category": cat, "mask_source": source})
    return {"id": sid, "person": person_name, "caption": caption, "garments": entries}, used


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--in", dest="source", type=Path, required=True, help="folder of photos and garments")
    parser.add_argument("--out", type=Path, required=True, help="dataset folder to write (manifest.jsonl inside)")
    parser.add_argument("--sam", type=Path, help="Segment Anything checkpoint (.pth) for prompt JSONs; else GrabCut")
    parser.add_argument("--device", default="cpu", help="device for SAM (cpu, cuda)")
    parser.add_argument(
        "--categories", default=",".join(CATEGORIES), help="garment categories (file suffixes), comma-separated"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing manifest in --out")


def main(args: argparse.Namespace) -> int:
    if not args.source.is_dir():
        print(f"error: '{args.source}' is not a folder")
        return 2
    if (args.out / MANIFEST).exists() and not args.overwrite:
        print(f"error: '{args.out / MANIFEST}' exists; pass --overwrite to replace it")
        return 2
    segmenter = Segmenter()
    try:
        print(f"masks from prompt JSONs: {segmenter.load(args.sam, args.device)}")
    except SamModelError as e:
        print(f"error: {e}")
        return 2
    categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    result = build_dataset(args.source, args.out, categories, segmenter)
    print(result.summary())
    return 0 if result.written else 1
