"""Photos of one garment -> a training folder of `NNN.png` (RGBA: alpha = the garment) + `NNN.txt` captions.

Every file gets a line in the report; one bad file never stops the import. The alpha channel is what
the trainer's masked loss keeps, so it is the garment: an existing alpha is kept as it is, otherwise
the background is removed with the segment package (SAM on the largest object when a SAM model is
loaded, GrabCut otherwise) or rembg when the user has it. Fully transparent pixels are made white,
so the picture is also a clean garment-on-white when the loss is not masked.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..files.images import IMAGE_SUFFIXES, MAX_PIXELS, ImageInputError, to_rgb_and_mask
from ..segment import mask_tools as mt
from ..segment.batch import Template
from ..segment.segmenter import Segmenter

BG_KEEP = "keep the whole photo"
BG_SEGMENT = "remove: SAM (largest object) when a SAM model is chosen, else GrabCut"
BG_REMBG = "remove: rembg"
NUMBERED = re.compile(r"^(\d+)$")
MIN_SIDE = 64  # px: smaller photos upscaled to the training size would teach blur (import and trainer refuse them)


def background_choices() -> list[str]:
    """rembg is offered only when the user installed it; the extension never installs it."""
    return [BG_SEGMENT, BG_KEEP] + ([BG_REMBG] if importlib.util.find_spec("rembg") is not None else [])


@dataclass
class ImportOptions:
    size: int = 512  # the square side, or the long side when keeping the aspect ratio
    background: str = BG_SEGMENT
    margin: float = 0.05  # around the garment's bounding box, as a fraction of its long side
    square: bool = True  # False: keep the aspect ratio (sides padded to multiples of 64, for buckets)
    min_side: int = MIN_SIDE


@dataclass
class ImportResult:
    name: str  # the file as the user knows it
    result: str  # "imported as 003.png (...)" or "skipped: why"
    saved: Path | None = None


def folder_sources(folder: Path) -> list[Path]:
    """Every file of a folder (not recursive), sorted; non-images are reported by the import, not hidden."""
    if not folder.is_dir():
        raise ValueError(f"'{folder}' is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() != ".txt")
    if not files:
        raise ValueError(f"'{folder}' has no files to import")
    return files


def dataset_images(folder: Path) -> list[Path]:
    """The images of a dataset folder in name order (the captions are their `.txt` twins)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def next_number(folder: Path) -> int:
    numbers = [int(m.group(1)) for p in dataset_images(folder) if (m := NUMBERED.match(p.stem))]
    return max(numbers, default=0) + 1


def import_images(
    sources: Iterable[Path | tuple[str, Path]],
    dataset_dir: Path,
    options: ImportOptions,
    segmenter: Segmenter,
    caption: Callable[[Image.Image], str],
    progress: Callable[[int, int, str], None] | None = None,
) -> list[ImportResult]:
    """Import each source ((display name, path) for uploads, whose temp names mean nothing to the user)
    into `dataset_dir` as the next free `NNN.png`, with `caption(picture)` in `NNN.txt`."""
    items = [s if isinstance(s, tuple) else (s.name, s) for s in sources]
    dataset_dir.mkdir(parents=True, exist_ok=True)
    number = next_number(dataset_dir)
    report = []
    for i, (name, path) in enumerate(items):
        if progress is not None:
            progress(i, len(items), name)
        try:
            picture, how = prepare(path, options, segmenter)
            target = dataset_dir / f"{number:03d}.png"
            picture.save(target)
            text = dataset_dir / f"{number:03d}.txt"
            text.write_text(caption(picture) + "\n", encoding="utf-8")
            report.append(ImportResult(name, f"imported as {target.name} ({how})", target))
            number += 1
        except (ImageInputError, ValueError) as e:
            report.append(ImportResult(name, f"skipped: {e}"))
        except UnidentifiedImageError:
            report.append(ImportResult(name, "skipped: unreadable: not an image PIL can read, or a corrupt one"))
        except (Image.DecompressionBombError, OSError, SyntaxError) as e:
            report.append(ImportResult(name, f"skipped: unreadable: {e}"))
    return report


def prepare(path: Path, options: ImportOptions, segmenter: Segmenter) -> tuple[Image.Image, str]:
    """One file -> the dataset picture and how its alpha was made. Raises ImageInputError with the reason."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ImageInputError(f"not an image file ({path.suffix or 'no extension'})")
    with Image.open(path) as opened:
        w, h = opened.size
        if w * h > MAX_PIXELS:  # checked on the header, before decoding
            raise ImageInputError(f"{w}x{h} is larger than {MAX_PIXELS // 1_000_000} MP")
        if min(w, h) < options.min_side:
            raise ImageInputError(f"too small ({w}x{h}; the minimum side is {options.min_side} px)")
        upright = ImageOps.exif_transpose(opened)  # phone photos: the camera's rotation tag applied
        rgb, alpha = to_rgb_and_mask(upright)
        if alpha is not None:  # the colours as they are, not blended with white at soft edges
            rgb = upright.convert("RGBA").convert("RGB")
    pixels = np.asarray(rgb, dtype=np.uint8)
    if alpha is not None:
        mask, how = np.asarray(alpha, dtype=np.uint8), "kept its alpha"
    else:
        mask, how = _remove_background(pixels, options.background, segmenter)
    if not mask.any():
        raise ImageInputError("no garment found: the mask is empty")
    picture = frame(pixels, mask, options)
    scale = options.size / max(mask.shape)
    if scale > 1.5:
        how += f", upscaled x{scale:.1f}: a larger photo would be sharper"
    return picture, how


def _remove_background(pixels: np.ndarray, method: str, segmenter: Segmenter) -> tuple[np.ndarray, str]:
    h, w = pixels.shape[:2]
    if method == BG_KEEP:
        return np.full((h, w), 255, np.uint8), "whole photo"
    if method == BG_REMBG:
        from rembg import remove

        cut = remove(Image.fromarray(pixels))
        return np.asarray(cut.getchannel("A"), dtype=np.uint8), "rembg"
    template = Template.largest_object()
    points, labels, box = template.on(w, h)
    result = segmenter.segment(pixels, points, labels, box)
    return mt.largest_component(result.mask).astype(np.uint8) * 255, result.engine


def frame(pixels: np.ndarray, mask: np.ndarray, options: ImportOptions) -> Image.Image:
    """Crop to the mask's bounding box plus a margin, pad (transparent white) to a square or to sides
    that are multiples of 64, and scale to `options.size`."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    pad = round(options.margin * max(y1 - y0, x1 - x0))
    y0, y1, x0, x1 = y0 - pad, y1 + pad, x0 - pad, x1 + pad
    if options.square:
        side = max(y1 - y0, x1 - x0)
        y0, x0 = y0 - (side - (y1 - y0)) // 2, x0 - (side - (x1 - x0)) // 2
        y1, x1 = y0 + side, x0 + side
    rgba = np.zeros((y1 - y0, x1 - x0, 4), np.uint8)
    rgba[..., :3] = 255
    sy0, sy1, sx0, sx1 = max(y0, 0), min(y1, mask.shape[0]), max(x0, 0), min(x1, mask.shape[1])
    rgba[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0, :3] = pixels[sy0:sy1, sx0:sx1]
    rgba[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0, 3] = mask[sy0:sy1, sx0:sx1]
    picture = Image.fromarray(rgba, "RGBA")
    if options.square:
        return _whiten(picture.resize((options.size, options.size), Image.Resampling.LANCZOS))
    scale = options.size / max(picture.size)
    fitted = picture.resize(
        (max(1, round(picture.width * scale)), max(1, round(picture.height * scale))), Image.Resampling.LANCZOS
    )
    canvas = Image.new("RGBA", (_up64(fitted.width), _up64(fitted.height)), (255, 255, 255, 0))
    canvas.paste(fitted, ((canvas.width - fitted.width) // 2, (canvas.height - fitted.height) // 2))
    return _whiten(canvas)


def _whiten(picture: Image.Image) -> Image.Image:
    """Fully transparent pixels white (resampling leaves them any colour)."""
    a = np.array(picture)
    a[a[..., 3] == 0, :3] = 255
    return Image.fromarray(a, "RGBA")


def _up64(n: int) -> int:
    return max(64, -(-n // 64) * 64)
