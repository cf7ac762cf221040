"""HTTP routes: POST /anydressing/v1/segment {image, points, labels, box, model} -> mask PNG;
POST /anydressing/v1/split-outfit {image} -> the garments found, each an RGBA cutout with its category."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from ..files.images import ImageInputError, load_image
from .outfit import split_outfit
from .parser import GarmentParser
from .sam_models import SamModelError, find_sam_files
from .segmenter import GRABCUT, Segmenter, as_rgb_array

ROUTE = "/anydressing/v1/segment"
SPLIT_ROUTE = "/anydressing/v1/split-outfit"


def segment_request(data: dict[str, Any], segmenter: Segmenter, sam_dirs: Callable[[], list[Path]]) -> dict[str, Any]:
    """The route's work, free of FastAPI; a ValueError carries the message for a 422 answer."""
    if not isinstance(data, dict) or "image" not in data:
        raise ValueError("send a JSON object with 'image' (base64) and 'points' and/or 'box'")
    try:
        image = as_rgb_array(load_image(data["image"]))
    except ImageInputError as e:
        raise ValueError(f"image: {e}") from e
    points = [tuple(map(float, p)) for p in data.get("points") or []]
    labels = [int(v) for v in data.get("labels") or [1] * len(points)]
    if any(len(p) != 2 for p in points) or len(labels) != len(points) or any(v not in (0, 1) for v in labels):
        raise ValueError("'points' must be [[x, y], ...] with one label 1 (include) or 0 (exclude) each")
    box = data.get("box")
    if box is not None and (len(box) != 4 or not float(box[0]) < float(box[2]) or not float(box[1]) < float(box[3])):
        raise ValueError("'box' must be [x0, y0, x1, y1] in pixels with x0 < x1 and y0 < y1")
    if not points and box is None:
        raise ValueError("give 'points' or a 'box'")
    height, width = image.shape[:2]
    for x, y in points:  # the segmenters would answer an empty mask
        if not (0 <= x < width and 0 <= y < height):
            raise ValueError(f"point ({x:g}, {y:g}) is outside the {width}x{height} image")
    model = data.get("model") or GRABCUT
    try:
        files = find_sam_files(sam_dirs())
        if model != GRABCUT and model not in files:
            raise ValueError(f"no SAM model '{model}' (found: {', '.join(files) or 'none'})")
        segmenter.load(None if model == GRABCUT else files[model], str(data.get("device") or "cpu"))
    except SamModelError as e:
        raise ValueError(str(e)) from e
    result = segmenter.segment(image, points, labels, None if box is None else tuple(map(float, box)))
    answer: dict[str, Any] = {
        "mask": _png(Image.fromarray(result.mask.astype("uint8") * 255, "L")),
        "engine": result.engine,
    }
    if result.candidates is not None:
        answer["scores"] = [float(s) for s in result.candidates.scores]
    return answer


def split_request(data: dict[str, Any], parser: Callable[[], GarmentParser]) -> dict[str, Any]:
    """The split route's work: {"garments": [{"category", "image" (RGBA PNG, base64), "box" [x0, y0, x1, y1]}]}
    in slot order; a ValueError (no image, no parser, no garment) carries the message for a 422 answer."""
    if not isinstance(data, dict) or "image" not in data:
        raise ValueError("send a JSON object with 'image' (base64)")
    try:
        photo = load_image(data["image"]).convert("RGB")
    except ImageInputError as e:
        raise ValueError(f"image: {e}") from e
    pieces = split_outfit(photo, parser().parts(photo))  # ParserError is a ValueError
    if not pieces:
        raise ValueError("no garment found on the photo (no person, or the parser saw no clothes)")
    return {"garments": [{"category": p.category, "image": _png(p.cutout), "box": list(p.box)} for p in pieces]}


def _png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def register(
    app: Any, segmenter: Segmenter, sam_dirs: Callable[[], list[Path]], parser: Callable[[], GarmentParser]
) -> None:
    """Add the routes to the WebUI's FastAPI app (from on_app_started)."""
    from fastapi import Body, HTTPException

    def answer(work: Callable[[], dict]) -> dict:
        try:
            return work()
        except ValueError as e:
            raise HTTPException(status_code=422, detail=str(e)) from e

    def segment(data: dict = Body(...)) -> dict:  # noqa: B008 (FastAPI's way to take a raw JSON body)
        return answer(lambda: segment_request(data, segmenter, sam_dirs))

    def split(data: dict = Body(...)) -> dict:  # noqa: B008
        return answer(lambda: split_request(data, parser))

    app.add_api_route(ROUTE, segment, methods=["POST"])
    app.add_api_route(SPLIT_ROUTE, split, methods=["POST"])
