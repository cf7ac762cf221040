"""Garment images of any PIL mode and size -> RGB tensors and masks the engine can use."""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

MAX_PIXELS = 64_000_000  # refuse decompression bombs rather than exhausting memory
MAX_ASPECT = 32  # fitted to a 512 px canvas, a thinner image is under 16 px: 2 latent cells
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")  # what a photo folder is read for


class ImageInputError(ValueError):
    """An image the extension cannot use, with a message meant for the user."""


def to_rgb_and_mask(image: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """RGB on white, plus the alpha channel as a mask when the image has a non-trivial one.

    Handles every mode a user can upload: RGBA/LA/P-with-transparency (alpha -> mask), CMYK, 16-bit
    and 32-bit grayscale (I;16, I, F: rescaled to 8-bit), 1-bit and plain L.
    """
    if image.width < 1 or image.height < 1:
        raise ImageInputError("the image is empty")
    if image.width * image.height > MAX_PIXELS:
        raise ImageInputError(f"the image is {image.width}x{image.height}: larger than {MAX_PIXELS // 1_000_000} MP")
    if max(image.size) > MAX_ASPECT * min(image.size):
        raise ImageInputError(
            f"the image is {image.width}x{image.height}: more than {MAX_ASPECT} times as long as it is wide, "
            "too thin to fit a garment canvas; crop it closer to the garment"
        )
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        span = a.max() - a.min()
        a = (a - a.min()) / span * 255 if span > 0 else np.zeros_like(a)
        image = Image.fromarray(a.astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    mask = None
    if image.mode in ("RGBA", "LA", "PA"):
        alpha = image.getchannel("A")
        if alpha.getextrema() != (255, 255):
            mask = alpha
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return image.convert("RGB"), mask


def fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale to fit (width, height) keeping the aspect ratio; RGB is padded white (the garment backdrop),
    masks with 0 (outside the garment)."""
    fill = (255, 255, 255) if image.mode == "RGB" else 0
    return ImageOps.pad(image, size, method=Image.Resampling.LANCZOS, color=fill)


def garment_tensor(image: Image.Image, size: tuple[int, int]) -> tuple[Tensor, Tensor | None]:
    """(3, H, W) in [-1, 1] and an optional (H, W) mask in [0, 1], at `size` = (width, height)."""
    rgb, mask = to_rgb_and_mask(image)
    rgb = fit(rgb, size)
    x = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    if mask is None:
        return x, None
    m = fit(mask, size)
    return x, torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0)


def tensor_to_image(x: Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> RGB image."""
    a = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(a, "RGB")


def side_by_side(tiles: list[Image.Image]) -> Image.Image:
    """Images of one height in a row, left to right, on white (the demo's and the trainer's grids)."""
    row = Image.new("RGB", (sum(t.width for t in tiles), max(t.height for t in tiles)), "white")
    x = 0
    for tile in tiles:
        row.paste(tile, (x, 0))
        x += tile.width
    return row


def load_image(value: Any) -> Image.Image:
    """A PIL image from a PIL image, a numpy array (gradio) or a base64 string (API, with or without data: URL)."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and "image" in value:  # gradio sketch/editor value
        return load_image(value["image"])
    if hasattr(value, "__array__"):
        return Image.fromarray(value)
    if isinstance(value, str):
        data = value.split(",", 1)[1] if value.startswith("data:") else value
        try:
            image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
            image.load()
        except (binascii.Error, ValueError) as e:
            raise ImageInputError("the image is not valid base64") from e
        except (UnidentifiedImageError, OSError) as e:
            raise ImageInputError("the data is not an image PIL can read") from e
        return image
    raise ImageInputError(f"expected an image, got {type(value).__name__}")


CANNY_THRESHOLDS = (100, 200)  # OpenCV's hysteresis thresholds on the 8-bit grey target image


def canny_edges(images: Tensor, thresholds: tuple[int, int] = CANNY_THRESHOLDS) -> Tensor:
    """(B, 1, H, W) in {0, 1}: OpenCV's Canny edges of (B, 3, H, W) images in [-1, 1] (no gradient)."""
    grey = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()
    edges = [
        cv2.Canny(np.ascontiguousarray(cv2.cvtColor(im.transpose(1, 2, 0), cv2.COLOR_RGB2GRAY)), *thresholds)
        for im in grey
    ]
    return torch.from_numpy(np.stack(edges)[:, None] > 0).to(images.device, torch.float32)
