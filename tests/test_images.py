"""Garment images of every mode and size a user can upload."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lib_anydressing.files.images import ImageInputError, garment_tensor, to_rgb_and_mask


def _rgba_cutout():
    im = Image.new("RGBA", (40, 20), (0, 0, 0, 0))
    im.paste((200, 10, 10, 255), (10, 5, 30, 15))
    return im


@pytest.mark.parametrize(
    "image",
    [
        _rgba_cutout(),
        Image.new("LA", (30, 30), (128, 255)),
        Image.new("P", (30, 30), 3),
        Image.new("CMYK", (30, 30), (0, 255, 255, 0)),
        Image.fromarray(np.arange(900, dtype=np.uint16).reshape(30, 30) * 70),  # 16-bit grayscale
        Image.new("L", (30, 30), 90),
        Image.new("1", (30, 30), 1),
        Image.new("F", (30, 30), 0.5),
        Image.new("RGB", (1, 1), (1, 2, 3)),
    ],
    ids=["RGBA", "LA", "P", "CMYK", "I;16", "L", "1", "F", "1x1"],
)
def test_every_mode_gives_rgb_in_range(image):
    x, mask = garment_tensor(image, (64, 48))
    assert x.shape == (3, 48, 64)
    assert x.min() >= -1 and x.max() <= 1
    assert mask is None or mask.shape == (48, 64)


def test_alpha_becomes_mask_and_background_white():
    rgb, mask = to_rgb_and_mask(_rgba_cutout())
    assert rgb.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white backdrop
    assert rgb.getpixel((20, 10)) == (200, 10, 10)
    assert mask.getpixel((0, 0)) == 0 and mask.getpixel((20, 10)) == 255
    x, m = garment_tensor(_rgba_cutout(), (40, 40))  # padded top and bottom: white image, zero mask
    assert m[0].max() == 0 and x[:, 0].min() == 1.0
    assert m[20, 20] > 0.9


def test_opaque_alpha_is_no_mask():
    assert to_rgb_and_mask(Image.new("RGBA", (8, 8), (1, 2, 3, 255)))[1] is None


def test_16_bit_contrast_is_kept():
    a = np.zeros((10, 10), dtype=np.uint16)
    a[:, 5:] = 60000
    rgb, _ = to_rgb_and_mask(Image.fromarray(a))
    assert rgb.getpixel((0, 0)) == (0, 0, 0) and rgb.getpixel((9, 0)) == (255, 255, 255)


def test_huge_image_is_refused_before_decoding_pixels():
    with pytest.raises(ImageInputError, match="larger than"):
        to_rgb_and_mask(Image.new("L", (9000, 8000)))


def test_8000_square_is_accepted():
    x, _ = garment_tensor(Image.new("RGB", (8000, 8000), (0, 255, 0)), (32, 32))
    assert x[1].min() == 1.0
