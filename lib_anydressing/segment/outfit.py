"""Split an outfit photo into garment cutouts: one RGBA crop per garment category the parse finds.

Only garments are cut out (not arms, legs or face). Parse specks are dropped: pieces of a garment smaller
than a tenth of its largest piece, and garments under `min_fraction` of the photo. The order is the
slots' usual one: top, bottom, dress, shoes, hat, bag, other.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from .parser import PART_INDEX

CUT: dict[str, tuple[str, ...]] = {  # category -> the parts that make it, in slot order
    "upper": ("upper",),
    "lower": ("lower", "belt"),
    "dress": ("dress",),
    "shoes": ("shoes",),
    "hat": ("hat",),
    "bag": ("bag",),
    "other": ("scarf",),
}


@dataclass
class OutfitPiece:
    category: str
    cutout: Image.Image  # RGBA, cropped to the garment (plus `pad` pixels); alpha is its mask
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 of the crop in the photo
    fraction: float  # of the photo's pixels


def split_outfit(photo: Image.Image, parts: np.ndarray, min_fraction: float = 0.002, pad: int = 4) -> list[OutfitPiece]:
    """The garments of `photo` parsed into `parts` ((H, W) PARTS indices at the photo's size)."""
    rgb = np.asarray(photo.convert("RGB"))
    if parts.shape != rgb.shape[:2]:
        raise ValueError(f"the parse is {parts.shape[1]}x{parts.shape[0]}, the photo {photo.width}x{photo.height}")
    pieces = []
    for category, names in CUT.items():
        mask = _without_specks(np.isin(parts, [PART_INDEX[n] for n in names]))
        fraction = float(mask.mean())
        if fraction < min_fraction:
            continue
        rows, cols = np.nonzero(mask)
        y0, y1 = max(int(rows.min()) - pad, 0), min(int(rows.max()) + 1 + pad, mask.shape[0])
        x0, x1 = max(int(cols.min()) - pad, 0), min(int(cols.max()) + 1 + pad, mask.shape[1])
        rgba = np.dstack([rgb, mask.astype(np.uint8) * 255])[y0:y1, x0:x1]
        pieces.append(OutfitPiece(category, Image.fromarray(rgba, "RGBA"), (x0, y0, x1, y1), fraction))
    return pieces


def _without_specks(mask: np.ndarray) -> np.ndarray:
    """`mask` less the connected pieces under a tenth of its largest (a shoe pair keeps both shoes)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 2:
        return mask
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.flatnonzero(areas >= areas.max() / 10) + 1
    return np.isin(labels, keep)
