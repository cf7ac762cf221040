"""AnyDressing's entries in the image parameters, written after a generation and read back on paste."""

from __future__ import annotations

import re

from ..garments import CATEGORIES
from .model_files import TRAINING_FREE, TRAINING_FREE_NAMES
from .options import DressingArgs, DressingOptions, option
from .prepare import image_digest

PREFIX = "AnyDressing"
PROBLEMS = f"{PREFIX} problems"  # why a generation went on without dressing; not pasted back
RANGE, GARMENTS = f"{PREFIX} range", f"{PREFIX} garments"  # start-end; the slots, one entry each


def key(name: str) -> str:
    """The infotext key of a DressingArgs field, as the field declares it."""
    return f"{PREFIX} {option(DressingArgs, name)['infotext']}"


GUIDANCE = key("garment_guidance")  # present only when it was on
MASK = key("mask_from_garments")  # img2img's 'mask from garments': "from garments, grow 8[, face and hair]"


def infotext(opts: DressingOptions, model_label: str, strength: float) -> dict[str, str]:
    """`model_label` is the model name with its short hash; garments are 'slot:category:hash:weight:region'."""
    garments = ", ".join(
        f"{slot.index + 1}:{slot.category}:{image_digest(slot.masked_image())}:{slot.weight:g}:"
        + ("box " + " ".join(f"{v:g}" for v in slot.box) if slot.box else slot.region)
        for slot in opts.slots
    )
    entries = {
        key("model"): model_label,
        key("strength"): f"{strength:g}",
        RANGE: f"{opts.start:g}-{opts.end:g}",
        key("resolution"): str(opts.resolution) if opts.resolution else f"auto x{opts.detail:g}",
        key("fine_pool"): str(opts.fine_pool),
        GARMENTS: garments,
    }
    if opts.garment_guidance is not None:
        entries[GUIDANCE] = f"{opts.garment_guidance:g}"
    return entries


def pasted(params: dict[str, str], n_slots: int) -> dict[str, object]:
    """The UI values an infotext sets: the same names as the script's arguments (images cannot be pasted)."""
    if key("model") not in params:
        return {}
    return {**_general(params), **_garments(params.get(GARMENTS, ""), n_slots)}


def _general(params: dict[str, str]) -> dict[str, object]:
    model = params[key("model")].split(" [")[0]
    values: dict[str, object] = {"enabled": True, "model": TRAINING_FREE if model in TRAINING_FREE_NAMES else model}
    for name in ("strength", "resolution", "fine_pool"):
        number = _float(params.get(key(name)))
        if number is not None:
            values[name] = number
    resolution = params.get(key("resolution"), "")
    if resolution.startswith("auto x") and _float(resolution[6:]) is not None:
        values["resolution"], values["detail"] = 0, _float(resolution[6:])
    if "fine_pool" in values:
        values["fine_pool"] = str(int(values["fine_pool"]))  # the UI's radio holds strings
    guidance = _float(params.get(GUIDANCE))
    values["garment_guidance_enabled"] = guidance is not None  # absent: the image was made without it
    if guidance is not None:
        values["garment_guidance"] = guidance
    mask = params.get(MASK)
    values["mask_from_garments"] = mask is not None  # absent: the image was made without it
    if mask is not None:
        grow = re.search(r"grow (\d+)", mask)
        if grow:
            values["mask_grow"] = int(grow.group(1))
        values["mask_face_hair"] = "face and hair" in mask
    start, _, end = params.get(RANGE, "").partition("-")
    if _float(start) is not None and _float(end) is not None:
        values["start"], values["end"] = _float(start), _float(end)
    return values


def _garments(entries: str, n_slots: int) -> dict[str, object]:
    """Each 'slot:category:hash:weight:region' entry's category, weight and region (or box corners)."""
    values: dict[str, object] = {}
    for entry in entries.split(","):
        number, category, _, weight, region = [*entry.strip().split(":", 4), "", "", "", "", ""][:5]
        if not number.isdigit() or not 1 <= int(number) <= n_slots:
            continue
        i = int(number) - 1
        if category in CATEGORIES:
            values[f"slot{i}_category"] = category
        if _float(weight) is not None:
            values[f"slot{i}_weight"] = _float(weight)
        values.update(_region(i, region))
    return values


def _region(i: int, region: str) -> dict[str, object]:
    if region in ("none", "mask"):
        return {f"slot{i}_region": region}
    corners = [_float(v) for v in region[4:].split()] if region.startswith("box ") else []
    if len(corners) != 4 or None in corners:
        return {}
    return {
        f"slot{i}_region": "box",
        **{f"slot{i}_box_{c}": v for c, v in zip(("x0", "y0", "x1", "y1"), corners, strict=False)},
    }


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None
