"""What a mask becomes: a cropped RGBA cutout, a square garment on white, files that never overwrite."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image


def cutout(image: np.ndarray, alpha: np.ndarray) -> Image.Image:
    """RGBA cropped to the mask's bounding box; `alpha` is a bool mask or a [0, 1] float (feathered)."""
    a = (np.clip(alpha.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    ys, xs = np.nonzero(a)
    if len(ys) == 0:
        raise ValueError("the mask is empty")
    rgba = np.dstack([image[..., :3], a])[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    return Image.fromarray(rgba, "RGBA")


def square_on_white(rgba: Image.Image, size: int, margin: float = 0.05) -> Image.Image:
    """The cutout centred on a white square of `size`, scaled to fit inside a small margin."""
    inner = max(1, round(size * (1 - 2 * margin)))
    scale = inner / max(rgba.width, rgba.height)
    fitted = rgba.resize((max(1, round(rgba.width * scale)), max(1, round(rgba.height * scale))), Image.LANCZOS)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(fitted, ((size - fitted.width) // 2, (size - fitted.height) // 2), fitted)
    return canvas


def free_path(folder: Path, stem: str, suffix: str = ".png") -> Path:
    """folder/stem.png, or stem-1.png, stem-2.png... whichever does not exist yet; the stem is sanitised."""
    folder.mkdir(parents=True, exist_ok=True)
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "garment"
    path, n = folder / f"{clean}{suffix}", 0
    while path.exists():
        n += 1
        path = folder / f"{clean}-{n}{suffix}"
    return path
