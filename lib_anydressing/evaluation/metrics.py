"""The paper's Table 1 metrics for one generated image, from unit-length CLIP embeddings.

- CLIP-T: cosine of the image and its prompt. Plain cosine: the paper's .2-.3 values are neither
  x100 nor clipped at 0 (CLIPScore's convention).
- CLIP-I: cosine of the image and each garment image, averaged over the garments.
- CLIP-I*: the same on each garment's own region of the image: the bounding box of the garment's
  mask, with the pixels outside the mask made white (the garment images are on white too), averaged
  over the garments. The paper finds the regions with OpenPose; here they come from masks (a box
  mask gives a plain box crop).
- CLIP-AS: the LAION aesthetic head on the image's CLIP ViT-L/14 embedding.
Garment images and regions are padded to a square on white before CLIP's resize and centre crop, so
no part of a garment is cut off; the whole generated image gets CLIP's usual resize and centre crop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..files.images import fit, to_rgb_and_mask
from .aesthetic import AestheticHead
from .clip_models import ClipEncoder

NAMES = {"clip_t": "CLIP-T", "clip_i": "CLIP-I", "clip_as": "CLIP-AS", "clip_i_star": "CLIP-I*"}


@dataclass
class SampleScores:
    clip_t: float
    clip_i: float
    clip_as: float | None = None  # None: no aesthetic predictor given
    clip_i_star: float | None = None  # None: not every garment has a mask


def on_white_square(image: Image.Image) -> Image.Image:
    """RGB on white, padded (not scaled) to a square: all of it survives CLIP's centre crop."""
    rgb, _ = to_rgb_and_mask(image)
    side = max(rgb.size)
    return fit(rgb, (side, side))


def garment_region(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """The bounding box of `mask` (bool, the image's size) cut from `image`, white outside the mask."""
    if mask.shape != (image.height, image.width):
        raise ValueError(f"mask {mask.shape[::-1]} and image {image.size} differ in size")
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        raise ValueError("the garment mask is empty")
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    crop = image.convert("RGB").crop(box)
    keep = Image.fromarray(mask[box[1] : box[3], box[0] : box[2]].astype(np.uint8) * 255, "L")
    return Image.composite(crop, Image.new("RGB", crop.size, (255, 255, 255)), keep)


def score_sample(
    image: Image.Image,
    prompt: str,
    garments: list[Image.Image],
    masks: list[np.ndarray | None],
    encoder: ClipEncoder,
    aesthetic: AestheticHead | None = None,
    aesthetic_encoder: ClipEncoder | None = None,
) -> SampleScores:
    """All metrics of one generated image; `masks[k]` is garment k's region in it (bool, its size) or None."""
    regions = [garment_region(image, m) for m in masks] if masks and all(m is not None for m in masks) else []
    embeddings = encoder.images([image] + [on_white_square(x) for x in [*garments, *regions]])
    own, flat, worn = embeddings[0], embeddings[1 : 1 + len(garments)], embeddings[1 + len(garments) :]
    text = encoder.texts([prompt])[0]
    scores = SampleScores(clip_t=float(own @ text), clip_i=float((flat @ own).mean()))
    if regions:
        scores.clip_i_star = float((worn * flat).sum(-1).mean())
    if aesthetic is not None:
        features = own if aesthetic_encoder is None else aesthetic_encoder.images([image])[0]
        scores.clip_as = float(aesthetic(features[None])[0])
    return scores


def mean_scores(scores: list[SampleScores]) -> dict[str, float | None]:
    """Each metric's mean over the samples that have it (None when none has)."""
    out: dict[str, float | None] = {}
    for key in NAMES:
        values = [getattr(s, key) for s in scores if getattr(s, key) is not None]
        out[key] = float(np.mean(values)) if values else None
    return out
