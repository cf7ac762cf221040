"""What the user asked for, from the UI's positional values or an API dict, checked once.

Every problem becomes a sentence naming the slot and what is wrong; nothing here raises on bad
input, so the WebUI can show the messages and go on without dressing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ..engine.token_pool import POOL_CHOICES
from ..files.images import ImageInputError, load_image, to_rgb_and_mask
from ..garments import CATEGORIES
from .model_files import TRAINING_FREE

REGIONS = ("none", "mask", "box")
SLOT_FIELDS = ("image", "mask", "category", "weight", "region", "box")
GENERAL_FIELDS = (
    "enabled", "model", "strength", "start", "end", "resolution", "detail", "fine_pool", "garment_guidance"
)  # fmt: skip


@dataclass
class GarmentSlot:
    """One garment: the image (RGB on white), its mask, and where and how strongly it acts."""

    image: Image.Image
    mask: Image.Image | None = None  # "L", the garment's own pixels (from a mask image or the alpha)
    category: str = "other"
    weight: float = 1.0
    region: str = "none"  # none | mask: the slot mask placed on the canvas | box
    box: tuple[float, float, float, float] | None = None  # x0, y0, x1, y1 as fractions of the canvas
    index: int = 0  # the UI slot it came from (0-based): empty slots in between keep their numbers

    def masked_image(self) -> Image.Image:
        """The garment alone on white: what GarmentsNet sees."""
        if self.mask is None:
            return self.image
        white = Image.new("RGB", self.image.size, (255, 255, 255))
        return Image.composite(self.image, white, self.mask)


@dataclass
class DressingOptions:
    enabled: bool = False
    model: str = TRAINING_FREE
    strength: float | None = None  # None: the model's default
    start: float = 0.0  # fraction of the sampling steps where dressing begins
    end: float = 1.0
    resolution: int = 0  # long side of the garment canvas in pixels; 0: the token budget (prepare.garment_canvas)
    detail: float = 1.0  # the token budget's factor: garment pixels per pixel of the image they cover
    fine_pool: int = 2  # garment tokens pooled in s x s windows at the finest layers (engine/token_pool.py)
    garment_guidance: float | None = None  # MagicClothing-style separate garment scale; None: off
    slots: list[GarmentSlot] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return self.enabled and bool(self.slots) and not self.problems


def from_values(general: dict[str, Any], slot_values: list[dict[str, Any]]) -> DressingOptions:
    """Options from plain values: UI components or an API dict, images as PIL or base64 strings."""
    opts = DressingOptions()
    problems = opts.problems
    opts.enabled = _flag(general.get("enabled", False), "enabled", problems)
    opts.model = str(general.get("model") or TRAINING_FREE)
    opts.strength = _number(general.get("strength"), "strength", problems, low=0.0, high=3.0, optional=True)
    opts.start = _number(general.get("start", 0.0), "start", problems, low=0.0, high=1.0) or 0.0
    end = _number(general.get("end", 1.0), "end", problems, low=0.0, high=1.0)
    opts.end = 1.0 if end is None else end
    if opts.start >= opts.end:
        problems.append(f"the dressing range is empty: start {opts.start} is not before end {opts.end}")
    resolution = _number(general.get("resolution", 0), "garment resolution", problems, low=0, high=1536)
    if resolution and resolution < 128:
        problems.append(f"garment resolution {resolution:g} is below 128 (0 follows the image size)")
    opts.resolution = int(resolution or 0)
    detail = _number(general.get("detail", 1.0), "garment detail", problems, low=0.25, high=4.0)
    opts.detail = 1.0 if detail is None else detail
    pool = _number(general.get("fine_pool", 2), "fine-layer pooling", problems, low=1, high=4)
    if pool is not None and pool not in POOL_CHOICES:
        problems.append(f"fine-layer pooling {pool:g} is not one of {', '.join(map(str, POOL_CHOICES))}")
    opts.fine_pool = int(pool) if pool in POOL_CHOICES else 2
    guidance = general.get("garment_guidance")
    opts.garment_guidance = _number(guidance, "garment guidance", problems, low=0.0, high=30.0, optional=True) or None
    for index, values in enumerate(slot_values, start=1):
        slot = _slot(index, values, problems)
        if slot is not None:
            opts.slots.append(slot)
    return opts


def from_api(data: dict[str, Any]) -> DressingOptions:
    """The API's dict form: {"enabled": true, "model": ..., "garments": [{"image": base64, ...}, ...]}."""
    unknown = sorted(set(data) - {*GENERAL_FIELDS, "garments"})
    opts = from_values(data, list(data.get("garments") or []))
    if unknown:
        opts.problems.append(f"unknown AnyDressing fields {unknown}; known: {[*GENERAL_FIELDS, 'garments']}")
    return opts


def _slot(index: int, values: dict[str, Any], problems: list[str]) -> GarmentSlot | None:
    where = f"garment {index}"
    unknown = sorted(set(values) - set(SLOT_FIELDS))
    if unknown:
        problems.append(f"{where}: unknown fields {unknown}; known: {list(SLOT_FIELDS)}")
    raw = values.get("image")
    if raw is None or raw == "":
        return None  # an empty slot is not a problem
    try:
        image, alpha = to_rgb_and_mask(load_image(raw))
        mask = values.get("mask")
        mask_image = _mask(load_image(mask), image.size, where) if mask not in (None, "") else alpha
    except (ImageInputError, ValueError) as e:
        problems.append(f"{where}: {e}")
        return None
    category = str(values.get("category") or "other")
    if category not in CATEGORIES:
        problems.append(f"{where}: category '{category}' is not one of {', '.join(CATEGORIES)}")
    weight = _number(values.get("weight", 1.0), f"{where} weight", problems, low=0.0, high=3.0)
    region = str(values.get("region") or "none")
    box = None
    if region not in REGIONS:
        problems.append(f"{where}: region '{region}' is not one of {', '.join(REGIONS)}")
    elif region == "mask" and mask_image is None:
        problems.append(f"{where}: region 'mask' needs a mask (or an RGBA cutout)")
    elif region == "box":
        box = _box(values.get("box"), where, problems)
    return GarmentSlot(image, mask_image, category, 1.0 if weight is None else weight, region, box, index - 1)


def _mask(image: Image.Image, size: tuple[int, int], where: str) -> Image.Image:
    """The mask as "L" at the garment's size; a mask of another shape is refused, not stretched."""
    if abs(image.width / image.height - size[0] / size[1]) > 0.02 * size[0] / size[1]:
        raise ImageInputError(f"the mask is {image.width}x{image.height} but the garment is {size[0]}x{size[1]}")
    rgb, alpha = to_rgb_and_mask(image)
    mask = alpha if alpha is not None else rgb.convert("L")
    return mask.resize(size, Image.Resampling.BILINEAR) if mask.size != size else mask


def _box(value: Any, where: str, problems: list[str]) -> tuple[float, float, float, float] | None:
    try:
        x0, y0, x1, y1 = (float(v) for v in value)
    except (TypeError, ValueError):
        problems.append(f"{where}: region 'box' needs [x0, y0, x1, y1] as fractions of the image")
        return None
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        problems.append(f"{where}: box {[x0, y0, x1, y1]} must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
        return None
    return x0, y0, x1, y1


_FLAGS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _flag(value: Any, name: str, problems: list[str]) -> bool:
    """A boolean from the UI or JSON; strings are read strictly, since bool("false") is True.

    An unreadable value is a problem and enables dressing, so the message is shown (not ignored).
    """
    if value is None or isinstance(value, bool) or (isinstance(value, int | float) and value in (0, 1)):
        return bool(value)
    flag = _FLAGS.get(str(value).strip().lower())
    if flag is None:
        problems.append(f"{name} must be true or false, not {value!r}")
        return True
    return flag


def _number(value: Any, name: str, problems: list[str], *, low: float, high: float, optional: bool = False):
    if value is None or value == "":
        if not optional:
            problems.append(f"{name} is missing")
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        problems.append(f"{name} must be a number, not {value!r}")
        return None
    if not low <= number <= high:
        problems.append(f"{name} {number} is outside {low}..{high}")
        return None
    return number


def from_script_args(args: Sequence[Any], n_slots: int) -> DressingOptions:
    """The script's arguments: the UI's flat values (see `script_arg_names`), or one API dict."""
    if args and isinstance(args[0], dict):
        return from_api(args[0])
    names = script_arg_names(n_slots)
    values = dict(zip(names, args, strict=False))  # API callers may pass fewer values: defaults follow
    general = {k: values[k] for k in GENERAL_FIELDS if values.get(k) is not None}
    problems: list[str] = []
    if not _flag(values.get("garment_guidance_enabled"), "garment guidance enabled", problems):
        general.pop("garment_guidance", None)
    slots = []
    for i in range(n_slots):
        slot = {f: values.get(f"slot{i}_{f}") for f in SLOT_FIELDS if f != "box"}
        box = [values.get(f"slot{i}_box_{c}") for c in ("x0", "y0", "x1", "y1")]
        slot["box"] = box if slot.get("region") == "box" else None
        slots.append(slot)
    opts = from_values(general, slots)
    opts.problems += problems
    return opts


def script_arg_names(n_slots: int) -> list[str]:
    """The order of the values the UI hands to the script: general settings, then each slot's."""
    general = ["enabled", "model", "strength", "start", "end", "resolution", "detail", "fine_pool"]
    general.append("garment_guidance_enabled")
    general.append("garment_guidance")
    per_slot = ["image", "mask", "category", "weight", "region", "box_x0", "box_y0", "box_x1", "box_y1"]
    return general + [f"slot{i}_{name}" for i in range(n_slots) for name in per_slot]


def apply_overrides(opts: DressingOptions, overrides: dict[str, float]) -> None:
    """Values set per cell by the X/Y/Z plot: 'strength', or 'weight N' for the garment in UI slot N."""
    for key, value in overrides.items():
        slot = next((s for s in opts.slots if key == f"weight {s.index + 1}"), None)
        if key == "strength":
            opts.strength = float(value)
        elif slot is not None:
            slot.weight = float(value)
        else:
            opts.problems.append(f"X/Y/Z value '{key}' does not apply: that garment slot is empty")
