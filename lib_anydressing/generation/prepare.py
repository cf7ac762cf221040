"""From checked options to what the engine takes: garment tensors, region masks, LoRA slots, cache keys."""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..engine import AnyDressingModel, GarmentFeatures
from ..engine.regions import region_tokens
from ..files.images import ImageInputError, garment_tensor
from .options import GarmentSlot


def garment_canvas(
    target_wh: tuple[int, int], slots: Sequence[GarmentSlot], resolution: int = 0, detail: float = 1.0
) -> tuple[int, int]:
    """(width, height) of the one canvas all garments are drawn on: the target's aspect, multiples of 64.

    `resolution` > 0 sets its long side. 0 ties it to the target (the token budget): the garments
    together get at most as many pixels, so tokens at every UNet level, as the parts of the image they
    are meant to cover, times `detail`. A garment with a region covers that region; one without covers
    an equal share of the image. Each dressed layer attends over all garment tokens, so this keeps the
    cost of dressing in proportion to the generation, whatever its size.
    """
    w, h = target_wh
    if resolution > 0:
        scale = resolution / max(w, h)
        return max(64, round(w * scale / 64) * 64), max(64, round(h * scale / 64) * 64)
    budget = w * h * sum(_coverage(slot, len(slots)) for slot in slots) * detail / max(len(slots), 1)
    scale = math.sqrt(budget / (w * h))
    sides = [
        (cw, ch)
        for cw in {max(64, math.floor(w * scale / 64) * 64), max(64, math.ceil(w * scale / 64) * 64)}
        for ch in {max(64, math.floor(h * scale / 64) * 64), max(64, math.ceil(h * scale / 64) * 64)}
    ]
    fitting = [(cw, ch) for cw, ch in sides if cw * ch <= budget * (1 + 1e-9)] or [min(sides, key=_area)]
    # the most pixels within the budget; then the target's aspect; then the taller (garments mostly are)
    return max(fitting, key=lambda s: (_area(s), -round(abs(math.log(s[0] * h / (s[1] * w))), 9), s[1]))


def _area(size: tuple[int, int]) -> int:
    return size[0] * size[1]


def _coverage(slot: GarmentSlot, n_slots: int) -> float:
    """The fraction of the image a garment is meant to cover: its region, else an equal share."""
    if slot.area is not None:
        return float(np.asarray(slot.area, dtype=np.float32).mean() / 255.0)
    if slot.region == "box" and slot.box is not None:
        x0, y0, x1, y1 = slot.box
        return (x1 - x0) * (y1 - y0)
    if slot.region == "mask" and slot.mask is not None:
        return float(np.asarray(slot.mask, dtype=np.float32).mean() / 255.0)
    return 1.0 / n_slots


def garment_batch(slots: Sequence[GarmentSlot], canvas_wh: tuple[int, int]) -> Tensor:
    """(N, 3, H, W) in [-1, 1]: each garment alone on white, fitted to the canvas."""
    return torch.stack([garment_tensor(slot.masked_image(), canvas_wh)[0] for slot in slots])


def region_masks(slots: Sequence[GarmentSlot], latent_hw: tuple[int, int]) -> list[Tensor | None]:
    """Where each garment may act on the target, at latent resolution; None means everywhere."""
    h, w = latent_hw
    masks: list[Tensor | None] = []
    for slot in slots:
        if slot.area is not None:  # area-averaged: the share of each latent pixel the region covers
            resized = slot.area.resize((w, h), Image.Resampling.BOX)
            masks.append(torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0))
        elif slot.region == "box" and slot.box is not None:
            x0, y0, x1, y1 = slot.box
            top, left = int(y0 * h), int(x0 * w)
            bottom, right = max(math.ceil(y1 * h), top + 1), max(math.ceil(x1 * w), left + 1)
            m = torch.zeros(h, w)
            m[top:bottom, left:right] = 1
            masks.append(m)
        elif slot.region == "mask" and slot.mask is not None:
            resized = slot.mask.resize((w, h), Image.Resampling.BILINEAR)
            masks.append(torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0))
        else:
            masks.append(None)
    return masks


def region_notes(
    slots: Sequence[GarmentSlot], regions: Sequence[Tensor | None], latent_hw: tuple[int, int]
) -> list[str]:
    """Check each region against the token grids it must steer: SD1.x and SDXL both dress the grids at 1/2
    and 1/4 of the latent (SDXL nothing finer), so a region that vanishes at 1/2 would leave the garment
    silently unused: an error; one that vanishes at 1/4 acts on the finer grids only: a note."""
    notes = []
    half = (math.ceil(latent_hw[0] / 2), math.ceil(latent_hw[1] / 2))
    quarter = (math.ceil(half[0] / 2), math.ceil(half[1] / 2))
    for slot, region in zip(slots, regions, strict=True):
        if region is None:
            continue
        if not region_tokens(region, half).any():
            where = "area on the photo" if slot.area is not None else f"{slot.region} region"
            raise ImageInputError(
                f"garment {slot.index + 1}: its {where} is too small to steer the model (it must "
                f"cover at least 16x16 pixels of the {latent_hw[1] * 8}x{latent_hw[0] * 8} image): make it "
                "larger, or set its region to none"
            )
        if not region_tokens(region, quarter).any():
            notes.append(f"garment {slot.index + 1}: its region is too small for the coarser UNet levels")
    return notes


def lora_slots(model: AnyDressingModel, slots: Sequence[GarmentSlot]) -> list[int] | None:
    """GFE LoRA slot per garment: the model slot named like the garment's category, else by position."""
    if model.lora is None:
        return None
    names = list(model.info.slots)
    free = [i for i in range(model.lora.n_slots) if i >= len(names) or names[i] not in {s.category for s in slots}]
    chosen = []
    for slot in slots:
        if slot.category in names and names.index(slot.category) < model.lora.n_slots:
            chosen.append(names.index(slot.category))
        elif free:
            chosen.append(free.pop(0))
        else:
            chosen.append(len(chosen) % model.lora.n_slots)
    return chosen


def content_key(slots: Sequence[GarmentSlot], *parts: object) -> str:
    """A hash of the garments' pixels and masks plus whatever else decides the features."""
    digest = hashlib.sha256()
    for slot in slots:
        digest.update(slot.masked_image().tobytes())
        digest.update(repr(slot.image.size).encode())
    for part in parts:
        data = part.detach().float().cpu().numpy().tobytes() if isinstance(part, Tensor) else repr(part).encode()
        digest.update(data)
    return digest.hexdigest()


def image_digest(image: Image.Image) -> str:
    """Short content hash of one garment, for the infotext."""
    return hashlib.sha256(image.tobytes()).hexdigest()[:10]


class FeatureCache:
    """A few recent garment feature sets, so re-generating with the same garments skips GarmentsNet.

    The session stores them on the CPU: an SDXL set is hundreds of MB (GarmentFeatures.nbytes), which a
    12 GB card should not hold while idle; copying it back costs milliseconds per generation.
    """

    def __init__(self, max_entries: int = 2) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[str, GarmentFeatures] = OrderedDict()

    def get(self, key: str) -> GarmentFeatures | None:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        return None

    def put(self, key: str, features: GarmentFeatures) -> None:
        self._items[key] = features
        self._items.move_to_end(key)
        while len(self._items) > max(self.max_entries, 0):
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()
