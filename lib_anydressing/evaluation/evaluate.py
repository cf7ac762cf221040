"""Score a folder of generated images against an evaluation manifest; a table like the paper's Table 1.

Manifest: JSONL, one line per test case, paths relative to the manifest's folder:

    {"id": "0001", "prompt": "a woman in a red blouse and jeans, in a park",
     "garments": [{"image": "garments/0001_upper.png", "mask": "masks/0001_upper.png"},
                  {"image": "garments/0001_lower.png", "mask": "masks/0001_lower.png"}],
     "image": "generated/0001.png"}

- `prompt` (or `caption`, so a training manifest serves too): the text the image was generated from.
- `garments[k].mask`, optional: garment k's region in the generated image (same size or same aspect,
  scaled); with a mask for every garment the case also gets CLIP-I*.
- `image`, optional: the generated image; when a folder of images is given instead, the image is
  `<folder>/<id>.png` (or .jpg .jpeg .webp), so one manifest scores several methods' folders.
A case with a missing or unreadable file is skipped and counted, like in the training dataset.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..files.images import ImageInputError
from ..files.manifest import SampleError, SkipReport, mask_array, open_image, read_manifest
from .aesthetic import AestheticHead
from .clip_models import ClipEncoder
from .metrics import NAMES, SampleScores, mean_scores, score_sample

GENERATED_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class EvalCase:
    id: str
    prompt: str
    garments: tuple[Path, ...]
    masks: tuple[Path | None, ...]
    image: Path | None


@dataclass
class RunResult:
    """The scores of one folder of generated images (or of the manifest's own `image` paths)."""

    label: str
    scores: dict[str, SampleScores] = field(default_factory=dict)
    report: SkipReport = field(default_factory=SkipReport)

    def means(self) -> dict[str, float | None]:
        return mean_scores(list(self.scores.values()))

    def as_json(self) -> dict:
        with_star = sum(s.clip_i_star is not None for s in self.scores.values())
        return {
            "images": self.label,
            "samples": len(self.scores),
            "samples_with_regions": with_star,
            **{NAMES[k]: v for k, v in self.means().items()},
            "skipped": dict(self.report.counts),
            "per_sample": {sid: {NAMES[k]: getattr(s, k) for k in NAMES} for sid, s in self.scores.items()},
        }


def parse_case(line: str, number: int, root: Path) -> EvalCase:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as e:
        raise SampleError("manifest line is not JSON") from e
    if not isinstance(data, dict):
        raise SampleError("manifest line is not a JSON object")
    prompt = data.get("prompt", data.get("caption"))
    garments = data.get("garments")
    if not isinstance(prompt, str):
        raise SampleError("no prompt")
    if (
        not isinstance(garments, list)
        or not garments
        or not all(isinstance(g, dict) and "image" in g for g in garments)
    ):
        raise SampleError("no garments")
    image = root / data["image"] if isinstance(data.get("image"), str) else None
    return EvalCase(
        str(data.get("id", number)),
        prompt,
        tuple(root / g["image"] for g in garments),
        tuple(root / g["mask"] if isinstance(g.get("mask"), str) else None for g in garments),
        image,
    )


def generated_path(case: EvalCase, folder: Path | None) -> Path:
    if folder is None:
        if case.image is None:
            raise SampleError("no generated image (no 'image' in the manifest and no images folder)")
        return case.image
    for suffix in GENERATED_SUFFIXES:
        if (folder / f"{case.id}{suffix}").is_file():
            return folder / f"{case.id}{suffix}"
    raise SampleError("missing file")


def region_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A mask file as bool at the generated image's (width, height), scaled if its aspect matches."""
    image = open_image(path)
    mask = mask_array(image) >= 0.5
    if image.size != size:
        if abs(image.width / image.height - size[0] / size[1]) > 0.01 * size[0] / size[1]:
            raise SampleError("mask aspect differs from the generated image")
        mask = np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))
    if not mask.any():
        raise SampleError("garment mask is empty")
    return mask


def evaluate(
    manifest: Path,
    folder: Path | None,
    encoder: ClipEncoder,
    aesthetic: AestheticHead | None = None,
    aesthetic_encoder: ClipEncoder | None = None,
) -> RunResult:
    result = RunResult(str(folder) if folder is not None else Path(manifest).name)
    for line_id, case in read_manifest(manifest, parse_case):
        result.report.total += 1
        try:
            if isinstance(case, SampleError):
                raise case
            image = open_image(generated_path(case, folder)).convert("RGB")
            garments = [open_image(p) for p in case.garments]
            masks = [None if p is None else region_mask(p, image.size) for p in case.masks]
            result.scores[case.id] = score_sample(
                image, case.prompt, garments, masks, encoder, aesthetic, aesthetic_encoder
            )
        except (SampleError, ImageInputError) as e:
            result.report.skip(case.id if isinstance(case, EvalCase) else line_id, str(e))
    return result


def fmt(value: float | None, key: str) -> str:
    """The paper's style: .289 for cosines, 5.881 for the aesthetic score; n/a when not measured."""
    if value is None:
        return "n/a"
    text = f"{value:.3f}"
    return text if key == "clip_as" else text.replace("0.", ".", 1)


def table(results: list[RunResult]) -> str:
    """A Markdown table with the columns of the paper's Table 1 (CLIP-I* for multi-garment cases)."""
    rows = ["| images | samples | CLIP-T | CLIP-I | CLIP-AS | CLIP-I* |", "|---|---|---|---|---|---|"]
    for r in results:
        means = r.means()
        cells = [r.label, str(len(r.scores)), *(fmt(means[k], k) for k in NAMES)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
