"""A tiny deterministic dressing dataset for tests: people in a textured top and textured trousers.

Each sample: a person image (background, head, an upper garment on the torso and a lower garment on
the legs), the two garments laid flat on white, their masks in the person image, and a caption that
names the colours and patterns. A few KB per sample at the default size; same seed, same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (200, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 200),
    "yellow": (220, 200, 40),
    "purple": (130, 50, 160),
    "orange": (230, 120, 30),
}
PATTERNS = ("striped", "checked", "plain")


def texture(height: int, width: int, colour: tuple[int, int, int], pattern: str, period: int) -> np.ndarray:
    """(H, W, 3) uint8: the colour with a darker pattern (stripes, checks or nothing)."""
    ys, xs = np.mgrid[0:height, 0:width]
    dark = np.zeros((height, width), dtype=bool)
    if pattern == "striped":
        dark = (ys // period) % 2 == 1
    elif pattern == "checked":
        dark = ((ys // period) + (xs // period)) % 2 == 1
    out = np.empty((height, width, 3), dtype=np.uint8)
    out[:] = colour
    out[dark] = (np.asarray(colour) * 0.45).astype(np.uint8)
    return out


def _shapes(height: int, width: int) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """Polygons (x, y) of a T-shirt and of trousers in a (height, width) frame."""
    h, w = height, width
    top = [(0.30, 0.22), (0.70, 0.22), (0.88, 0.36), (0.78, 0.42), (0.70, 0.36), (0.70, 0.55), (0.30, 0.55)]
    top += [(0.30, 0.36), (0.22, 0.42), (0.12, 0.36)]
    legs = [(0.31, 0.55), (0.69, 0.55), (0.68, 0.96), (0.53, 0.96), (0.50, 0.68), (0.47, 0.96), (0.32, 0.96)]
    return [(x * w, y * h) for x, y in top], [(x * w, y * h) for x, y in legs]


def _polygon_mask(size: tuple[int, int], polygon: list[tuple[float, float]]) -> Image.Image:
    mask = Image.new("L", (size[1], size[0]), 0)
    ImageDraw.Draw(mask).polygon(polygon, fill=255)
    return mask


def _flat(pattern_rgb: np.ndarray, polygon: list[tuple[float, float]], size: tuple[int, int]) -> Image.Image:
    """The garment alone, laid flat: its pattern inside its outline, on a white canvas cropped to it."""
    mask = _polygon_mask(size, polygon)
    white = Image.new("RGB", mask.size, (255, 255, 255))
    flat = Image.composite(Image.fromarray(pattern_rgb, "RGB"), white, mask)
    return flat.crop(mask.getbbox())


def make_synthetic_dataset(
    root: Path | str, n_samples: int = 4, size: tuple[int, int] = (64, 48), seed: int = 0
) -> Path:
    """Write `n_samples` samples under `root` (person/, garments/, masks/, manifest.jsonl) at
    `size` = (height, width); returns the manifest path. Categories: "upper" and "lower"."""
    root = Path(root)
    for sub in ("person", "garments", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    names = list(COLOURS)
    top_shape, legs_shape = _shapes(h, w)
    lines = []
    for i in range(n_samples):
        sid = f"{i:04d}"
        c_up, c_low = rng.choice(len(names), size=2, replace=False)
        p_up, p_low = (PATTERNS[int(k)] for k in rng.integers(0, len(PATTERNS), size=2))
        period = max(2, h // 16)
        up = texture(h, w, COLOURS[names[c_up]], p_up, period)
        low = texture(h, w, COLOURS[names[c_low]], p_low, period + 1)
        background = tuple(int(v) for v in rng.integers(170, 240, size=3))
        person = Image.new("RGB", (w, h), background)
        draw = ImageDraw.Draw(person)
        draw.ellipse((0.40 * w, 0.04 * h, 0.60 * w, 0.21 * h), fill=(225, 185, 150))  # head
        up_mask, low_mask = _polygon_mask(size, top_shape), _polygon_mask(size, legs_shape)
        person.paste(Image.fromarray(low, "RGB"), (0, 0), low_mask)
        person.paste(Image.fromarray(up, "RGB"), (0, 0), up_mask)
        # the top is drawn over the trousers: the trousers' mask is what stays visible of them
        low_mask = Image.fromarray(((np.asarray(low_mask) > 0) & (np.asarray(up_mask) == 0)).astype(np.uint8) * 255)
        person.save(root / "person" / f"{sid}.png")
        garments = []
        for cat, pattern_rgb, shape, mask in (("upper", up, top_shape, up_mask), ("lower", low, legs_shape, low_mask)):
            _flat(pattern_rgb, shape, size).save(root / "garments" / f"{sid}_{cat}.png")
            mask.save(root / "masks" / f"{sid}_{cat}.png")
            garments.append({"image": f"garments/{sid}_{cat}.png", "mask": f"masks/{sid}_{cat}.png", "category": cat})
        caption = f"a person wearing a {p_up} {names[c_up]} shirt and {p_low} {names[c_low]} trousers"
        lines.append(json.dumps({"id": sid, "person": f"person/{sid}.png", "caption": caption, "garments": garments}))
    manifest = root / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest
