"""What the user asked for, declared once and checked once.

`DressingArgs` and `GarmentArgs` (pydantic's v1 API, as adetailer uses it on both WebUIs) declare every
option with its label, default, bounds, choices, slider range and infotext key; the accordion, the HTTP
API, the script's argument order and the infotext all read them from there. Every problem becomes a
sentence naming the slot and what is wrong; nothing here raises on bad input, so the WebUI can show the
messages and go on without dressing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from ..engine.token_pool import POOL_CHOICES
from ..files.images import ImageInputError, load_image, to_rgb_and_mask
from ..files.settings_model import BaseModel, Extra, Field, ValidationError, validator
from ..garments import CATEGORIES
from .model_files import TRAINING_FREE

REGIONS = ("none", "mask", "box")
_FLAGS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _option(default: Any, label: str, says: str = "", **extra: Any) -> Any:
    """A field with what each consumer reads: `label` (the accordion), `says` (how messages name it; default the
    label), and in `extra`: ge/le bounds, `choices`, `ui` = (min, max, step[, value]) for a slider whose range
    or starting value differs from the API's, `infotext` (its key after "AnyDressing ")."""
    bounds = {k: extra.pop(k) for k in ("ge", "le") if k in extra}
    return Field(default, title=label, says=says or label, **bounds, **extra)


def strict_flag(value: Any) -> bool:
    """A boolean from the UI or JSON; strings are read strictly, since bool("false") is True."""
    if value is None or isinstance(value, bool) or (isinstance(value, int | float) and value in (0, 1)):
        return bool(value)
    flag = _FLAGS.get(str(value).strip().lower()) if isinstance(value, str) else None
    if flag is None:
        raise ValueError("must be true or false")
    return flag


class GarmentArgs(BaseModel):
    """One garment slot, as the API sends it (`garments` list) or the accordion's slot components."""

    image: Any = _option(None, "Garment", "image")  # PIL image or base64 string; None: an empty slot
    mask: Any = _option(None, "mask (optional)", "mask")
    category: str = _option("other", "category", choices=CATEGORIES)
    weight: float = _option(1.0, "weight", ge=0.0, le=3.0, ui=(0.0, 2.0, 0.05))
    region: str = _option("none", "region", choices=REGIONS)
    box: Any = _option(None, "box", box=("x0", "y0", "x1", "y1"))  # [x0, y0, x1, y1] as fractions of the image

    class Config:
        extra = Extra.forbid


class DressingArgs(BaseModel):
    """The general options; `garments` holds the slots' raw values, each read as a GarmentArgs."""

    enabled: bool = _option(False, "AnyDressing", "enabled")
    model: str = _option(TRAINING_FREE, "Model", "model", infotext="model")
    strength: float | None = _option(
        None, "Strength (lambda)", "strength", ge=0.0, le=3.0, ui=(0.0, 2.0, 0.05, 1.0), infotext="strength"
    )  # None: the model's default
    start: float = _option(0.0, "Start", "start", ge=0.0, le=1.0, ui=(0.0, 1.0, 0.01))  # fraction of the steps
    end: float = _option(1.0, "End", "end", ge=0.0, le=1.0, ui=(0.0, 1.0, 0.01))
    resolution: int = _option(  # long side of the garment canvas; 0: the token budget (prepare.garment_canvas)
        0, "Garment resolution (0: follow the image)", "garment resolution", ge=0, le=1536, ui=(0, 1024, 64),
        infotext="resolution",
    )  # fmt: skip
    detail: float = _option(  # the token budget's factor: garment pixels per pixel of the image they cover
        1.0, "Garment detail (with resolution 0)", "garment detail", ge=0.25, le=4.0, ui=(0.25, 4.0, 0.25)
    )
    fine_pool: int = _option(  # garment tokens pooled in s x s windows at the finest layers (engine/token_pool.py)
        2, "Pool finest-layer garment tokens (s x s)", "fine-layer pooling", choices=POOL_CHOICES,
        infotext="fine pooling",
    )  # fmt: skip
    garment_guidance: float | None = _option(
        None,
        "Garment guidance scale",
        "garment guidance",
        ge=0.0,
        le=30.0,
        ui=(0.0, 10.0, 0.1, 2.5),
        infotext="garment guidance",
    )  # MagicClothing-style separate garment scale; None: off
    mask_from_garments: bool = _option(  # img2img: the inpaint mask and regions from the photo's parse
        False, "Mask from garments (img2img: parse the photo, replace what the garments replace)",
        "mask from garments", infotext="mask",
    )  # fmt: skip
    mask_grow: int = _option(8, "Mask grow (pixels)", "mask grow", ge=0, le=128, ui=(0, 64, 1))
    mask_face_hair: bool = _option(False, "Mask may cover face and hair", "mask face and hair")
    garments: list = Field(default_factory=list)

    class Config:
        extra = Extra.forbid

    _strict = validator("enabled", "mask_from_garments", "mask_face_hair", pre=True, allow_reuse=True)(strict_flag)


GENERAL_FIELDS = tuple(name for name in DressingArgs.__fields__ if name != "garments")
SLOT_FIELDS = tuple(GarmentArgs.__fields__)


def option(model: type[BaseModel], name: str) -> dict[str, Any]:
    """A field's declaration as the accordion reads it: label, default, ge/le, choices, ui, infotext."""
    f = model.__fields__[name]
    info = f.field_info
    return {"label": info.title, "default": f.default, "ge": info.ge, "le": info.le, **info.extra}


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
    area: Image.Image | None = None  # "L" at the generated frame: its region on a parsed photo; wins over `region`

    def masked_image(self) -> Image.Image:
        """The garment alone on white: what GarmentsNet sees."""
        if self.mask is None:
            return self.image
        white = Image.new("RGB", self.image.size, (255, 255, 255))
        return Image.composite(self.image, white, self.mask)


class DressingOptions(DressingArgs):
    """The checked request: DressingArgs' values, the garment slots that can be used (images loaded), and
    every problem found (the WebUI shows them and generates without dressing)."""

    slots: list = Field(default_factory=list)  # GarmentSlot, in UI order
    problems: list = Field(default_factory=list)  # str sentences

    @property
    def usable(self) -> bool:
        return self.enabled and bool(self.slots) and not self.problems


def from_values(general: dict[str, Any], slot_values: list[dict[str, Any]]) -> DressingOptions:
    """Options from plain values: UI components or an API dict, images as PIL or base64 strings."""
    problems: list[str] = []
    args = _parse(DressingArgs, general, "", problems)
    opts = DressingOptions(**args.dict(include=set(GENERAL_FIELDS)), problems=problems)
    if opts.start >= opts.end:
        problems.append(f"the dressing range is empty: start {opts.start} is not before end {opts.end}")
    if 0 < opts.resolution < 128:
        problems.append(f"garment resolution {opts.resolution} is below 128 (0 follows the image size)")
        opts.resolution = 0
    opts.model = opts.model or TRAINING_FREE
    opts.garment_guidance = opts.garment_guidance or None
    if not _checked_choice(DressingArgs, "fine_pool", opts.fine_pool, "", problems):
        opts.fine_pool = DressingArgs.__fields__["fine_pool"].default
    for index, values in enumerate(slot_values, start=1):
        slot = _slot(index, values, problems)
        if slot is not None:
            opts.slots.append(slot)
    return opts


def from_api(data: dict[str, Any]) -> DressingOptions:
    """The API's dict form: {"enabled": true, "model": ..., "garments": [{"image": base64, ...}, ...]}."""
    general = {k: v for k, v in data.items() if k != "garments"}
    return from_values(general, list(data.get("garments") or []))


def _parse(model: type[BaseModel], values: dict[str, Any], where: str, problems: list[str]) -> Any:
    """`model` from `values`; each bad value becomes a sentence and falls back to the field's default (an
    unreadable `enabled` turns dressing on, so the WebUI shows the message instead of ignoring it)."""
    try:
        return model(**values)
    except ValidationError as e:
        errors = e.errors()
    bad = {str(err["loc"][0]) for err in errors}
    unknown = sorted(bad - set(model.__fields__))
    if unknown:
        known = [*model.__fields__]
        problems.append(f"{where + ': ' if where else 'AnyDressing: '}unknown fields {unknown}; known: {known}")
    for err in errors:
        name = str(err["loc"][0])
        if name in model.__fields__:
            problems.append(_sentence(model, name, values.get(name), err["type"], where))
    clean = {k: v for k, v in values.items() if k not in bad}
    if "enabled" in bad and "enabled" in model.__fields__:
        clean["enabled"] = True
    return model(**clean)


def _sentence(model: type[BaseModel], name: str, value: Any, kind: str, where: str) -> str:
    spec = option(model, name)
    who = f"{where} {spec['says']}".strip()
    if model.__fields__[name].outer_type_ is bool:
        return f"{who} must be true or false, not {value!r}"
    if value is None or value == "":
        return f"{who} is missing"
    if kind in ("value_error.number.not_ge", "value_error.number.not_le"):
        return f"{who} {float(value)} is outside {spec['ge']}..{spec['le']}"
    if spec.get("choices"):
        return f"{who} {value!r} is not one of {', '.join(map(str, spec['choices']))}"
    return f"{who} must be a number, not {value!r}"


def _checked_choice(model: type[BaseModel], name: str, value: Any, where: str, problems: list[str]) -> bool:
    """Whether `value` is one of the field's declared choices; if not, the sentence that says so."""
    spec = option(model, name)
    if value in spec["choices"]:
        return True
    shown = f"'{value}'" if isinstance(value, str) else f"{value:g}"
    problems.append(f"{where}{spec['says']} {shown} is not one of {', '.join(map(str, spec['choices']))}")
    return False


def _slot(index: int, values: dict[str, Any], problems: list[str]) -> GarmentSlot | None:
    where = f"garment {index}"
    raw = values.get("image")
    if raw is None or raw == "":
        return None  # an empty slot is not a problem
    present = {k: v for k, v in values.items() if v is not None}
    args = _parse(GarmentArgs, present, where, problems)
    try:
        image, alpha = to_rgb_and_mask(load_image(raw))
        mask = values.get("mask")
        mask_image = _mask(load_image(mask), image.size, where) if mask not in (None, "") else alpha
    except (ImageInputError, ValueError) as e:
        problems.append(f"{where}: {e}")
        return None
    _checked_choice(GarmentArgs, "category", args.category, f"{where}: ", problems)
    box = None
    if not _checked_choice(GarmentArgs, "region", args.region, f"{where}: ", problems):
        pass
    elif args.region == "mask" and mask_image is None:
        problems.append(f"{where}: region 'mask' needs a mask (or an RGBA cutout)")
    elif args.region == "box":
        box = _box(args.box, where, problems)
    return GarmentSlot(image, mask_image, args.category, args.weight, args.region, box, index - 1)


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


def from_script_args(args: Sequence[Any], n_slots: int) -> DressingOptions:
    """The script's arguments: the UI's flat values (see `script_arg_names`), or one API dict."""
    if args and isinstance(args[0], dict):
        return from_api(args[0])
    names = script_arg_names(n_slots)
    values = dict(zip(names, args, strict=False))  # API callers may pass fewer values: defaults follow
    general = {k: values[k] for k in GENERAL_FIELDS if values.get(k) is not None}
    problems: list[str] = []
    try:
        guided = strict_flag(values.get("garment_guidance_enabled"))
    except ValueError:
        problems.append(f"garment guidance enabled must be true or false, not {values['garment_guidance_enabled']!r}")
        guided = True
    if not guided:
        general.pop("garment_guidance", None)
    slots = []
    for i in range(n_slots):
        slot = {f: values.get(f"slot{i}_{f}") for f in SLOT_FIELDS if f != "box"}
        box = [values.get(f"slot{i}_box_{c}") for c in option(GarmentArgs, "box")["box"]]
        slot["box"] = box if slot.get("region") == "box" else None
        slots.append(slot)
    opts = from_values(general, slots)
    opts.problems += problems
    return opts


def script_arg_names(n_slots: int) -> list[str]:
    """The order of the values the UI hands to the script: general settings, then each slot's."""
    general = [*GENERAL_FIELDS]
    general.insert(general.index("garment_guidance"), "garment_guidance_enabled")  # the UI's switch for it
    corners = option(GarmentArgs, "box")["box"]
    per_slot = [*(f for f in SLOT_FIELDS if f != "box"), *(f"box_{c}" for c in corners)]
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
