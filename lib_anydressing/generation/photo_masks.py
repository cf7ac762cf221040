"""Dressing a photo: the inpaint mask and each garment's region, from the photo's parse and the garments.

A garment replaces the body parts its category names (`REPLACES`): a top takes the upper clothes and the
arms, so a long sleeve can replace a short one; trousers the lower clothes, the legs and the belt. The
mask is the union of those areas, grown by `grow` pixels so a looser garment has room, and never covers
the face or the hair unless asked. Each garment's region is its own grown area inside the mask, so one
pass dresses every garment in its place (regions as in Instance-Level Garment Localization). A garment
with a box keeps its box, which joins the mask. A mask the user painted wins: the regions are clipped
to it. Everything here is in the photo's pixels; the WebUI maps the result onto the frame it samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from ..segment.parser import PART_INDEX
from .options import GarmentSlot

REPLACES: dict[str, tuple[str, ...]] = {
    "upper": ("upper", "arms"),
    "lower": ("lower", "legs", "belt"),
    "dress": ("upper", "lower", "dress", "arms", "legs", "belt"),
    "hat": ("hat",),
    "shoes": ("shoes",),
    "bag": ("bag",),
    "other": (),  # no parts of its own: it acts anywhere inside the mask
}
KEPT = ("face", "hair")  # outside the mask unless `cover_face_hair`


class PhotoMaskError(ValueError):
    """Why a photo cannot be dressed with these garments, naming the garment."""


@dataclass
class PhotoMask:
    """The inpaint mask and one region per slot ((H, W) bool, None: anywhere inside the mask)."""

    mask: np.ndarray
    regions: list[np.ndarray | None]


def photo_mask(
    parts: np.ndarray, slots: Sequence[GarmentSlot], grow: int = 8, cover_face_hair: bool = False,
    painted: np.ndarray | None = None,
) -> PhotoMask:  # fmt: skip
    """The mask and regions for `slots` on a photo parsed into `parts` ((H, W) PARTS indices).

    `painted`, the user's own inpaint mask ((H, W) bool), replaces the built mask; regions are clipped to it.
    Raises PhotoMaskError naming the garment whose area the photo lacks, or when nothing is left to dress.
    """
    h, w = parts.shape
    kept = np.isin(parts, [PART_INDEX[p] for p in KEPT]) if not cover_face_hair else np.zeros((h, w), bool)
    regions: list[np.ndarray | None] = []
    for slot in slots:
        if slot.region == "box" and slot.box is not None:
            x0, y0, x1, y1 = slot.box
            area = np.zeros((h, w), bool)
            area[round(y0 * h) : round(y1 * h), round(x0 * w) : round(x1 * w)] = True
            regions.append(area)
            continue
        wanted = REPLACES[slot.category]
        if not wanted:
            regions.append(None)
            continue
        area = np.isin(parts, [PART_INDEX[p] for p in wanted])
        if not area.any():
            raise PhotoMaskError(
                f"garment {slot.index + 1} ({slot.category}): the photo has no {' or '.join(wanted)} to replace: "
                "paint the mask yourself, or give the garment a box region"
            )
        regions.append(_grown(area, grow) & ~kept)
    areas = [r for r in regions if r is not None]
    if not areas:
        raise PhotoMaskError(
            "no garment has an area on the photo: give the garments their categories (upper, lower, dress, hat, "
            "shoes, bag), or paint the mask"
        )
    mask = np.logical_or.reduce(areas) if painted is None else painted.astype(bool)
    if painted is not None:
        if painted.shape != (h, w):
            raise PhotoMaskError(f"the painted mask is {painted.shape[1]}x{painted.shape[0]}, the photo {w}x{h}")
        for slot, region in zip(slots, regions, strict=True):
            if region is not None and not (region & mask).any():
                raise PhotoMaskError(
                    f"garment {slot.index + 1} ({slot.category}): the painted mask covers none of its area"
                )
    return PhotoMask(mask, [None if r is None else r & mask for r in regions])


def _grown(area: np.ndarray, grow: int) -> np.ndarray:
    """`area` dilated by `grow` pixels (a disc), so the mask has room for a garment looser than the old one."""
    if grow <= 0:
        return area
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1))
    return cv2.dilate(area.astype(np.uint8), disc).astype(bool)


def as_image(mask: np.ndarray) -> Image.Image:
    """A bool mask as the WebUI takes one: "L", white where the image is generated."""
    return Image.fromarray(mask.astype(np.uint8) * 255, "L")


COLOURS = ((230, 60, 60), (60, 120, 230), (60, 190, 90), (230, 190, 40), (170, 80, 210), (40, 200, 200))


def preview(photo: Image.Image, result: PhotoMask) -> Image.Image:
    """The photo dimmed outside the mask, each garment's region tinted in its own colour (slot order)."""
    rgb = np.asarray(photo.convert("RGB").resize(result.mask.shape[::-1]), dtype=np.float32)
    out = np.where(result.mask[..., None], rgb, rgb * 0.35)
    for i, region in enumerate(result.regions):
        if region is not None:
            tint = np.array(COLOURS[i % len(COLOURS)], dtype=np.float32)
            out = np.where(region[..., None], out * 0.5 + tint * 0.5, out)
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))
