"""Dress a photo in img2img: the inpaint mask from the garments (before A1111's `p.init`), their regions on
the frame that is sampled (after it), and the preview image.

A1111 1.10.1 and Forge share this part of `StableDiffusionProcessingImg2Img.init` (modules/processing.py):
`p.image_mask` is read there, at the init image's size; with "Only masked" (`inpaint_full_res`) it is
cropped to a region whose box is kept as `p.paste_to` (x, y, w, h) and the crop resized to width x height
with resize mode 2; otherwise it is resized with `p.resize_mode`. The regions take the same path, through
the WebUI's own `images.resize_image`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ..generation.options import DressingOptions
from ..generation.photo_masks import PhotoMask, as_image, photo_mask, preview
from ..segment.parser import INSTALL_HINT, PARSERS, find_parsers

OURS = "anydressing"  # marks a mask this extension set, so img2img batch (which reuses p) parses each photo


@dataclass
class DressedPhoto:
    """What the photo's parse decided for one generation."""

    mask: PhotoMask
    preview: Image.Image
    painted: bool  # the user's own mask was kept


def mask_photo(p: Any, opts: DressingOptions, parser_dirs: list, parser_name: str, device: Any) -> DressedPhoto:
    """Parse the init image and set `p.image_mask` from the garments (unless the user painted one).

    Raises ValueError subclasses (no img2img, no parser, no garment area) with a message for the user.
    """
    photos = getattr(p, "init_images", None)
    if not photos:
        raise ValueError("'mask from garments' works in img2img: it parses the photo being dressed")
    photo = photos[0].convert("RGB")
    parts = PARSERS.get(parser_dirs, parser_name, device).parts(photo)
    painted = _painted(p, photo.size)
    result = photo_mask(parts, opts.slots, opts.mask_grow, opts.mask_face_hair, painted)
    if painted is None:
        mask = as_image(result.mask)
        mask.info[OURS] = True
        p.image_mask = mask
        p.inpainting_mask_invert = 0  # ours marks what is generated
    return DressedPhoto(result, preview(photo, result), painted is not None)


def _painted(p: Any, size: tuple[int, int]) -> np.ndarray | None:
    """The user's mask as a bool array at the photo's size (white or opaque: inpainted), or None."""
    mask = getattr(p, "image_mask", None)
    if mask is None or mask.info.get(OURS):
        return None
    alpha = mask.mode == "RGBA" and mask.getextrema()[3] != (255, 255)  # as A1111's create_binary_mask reads it
    plane = mask.getchannel("A") if alpha else mask.convert("L")
    if plane.size != size:
        plane = plane.resize(size, Image.Resampling.NEAREST)
    painted = np.asarray(plane) > 128
    if getattr(p, "inpainting_mask_invert", 0):
        painted = ~painted
    return painted if painted.any() else None


def place_regions(p: Any, photo: DressedPhoto, opts: DressingOptions) -> None:
    """Each slot's region, from the photo's pixels onto the frame `p.init` prepared for sampling."""
    from modules import images

    crop = getattr(p, "paste_to", None) if getattr(p, "inpaint_full_res", False) else None
    for slot, region in zip(opts.slots, photo.mask.regions, strict=True):
        if region is None:
            slot.area = None
            continue
        image = as_image(region)
        if crop:
            x, y, w, h = crop
            placed = images.resize_image(2, image.crop((x, y, x + w, y + h)), p.width, p.height)
        else:
            placed = images.resize_image(p.resize_mode, image, p.width, p.height)
        slot.area = placed.convert("L")  # modes 1 and 2 return RGB


def infotext_value(photo: DressedPhoto, opts: DressingOptions) -> str:
    """The infotext's record of how the mask was made."""
    if photo.painted:
        return "painted, regions from garments"
    return f"from garments, grow {opts.mask_grow}" + (", face and hair" if opts.mask_face_hair else "")


def parser_status(dirs: list, name: str) -> str:
    """The line under the photo-mask options: the parser in use, or what to install and what works without."""
    found = find_parsers(dirs)
    if name and name not in found:
        installed = f"installed: {', '.join(found)}" if found else INSTALL_HINT
        return f"The clothes parser '{name}' chosen in Settings > AnyDressing is not installed; {installed}."
    if found:
        chosen = name or next(iter(found))
        return f"Clothes parser: **{chosen}** ({found[chosen]})"
    return (
        f"No clothes parser for 'Mask from garments': {INSTALL_HINT}. Without one, paint the mask "
        "(or cut it in the Segment garment tab and send it to Inpaint upload) and give garments box regions."
    )
