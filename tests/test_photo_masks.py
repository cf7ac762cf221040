"""The inpaint mask and per-garment regions built from a parse, checked pixel by pixel on a synthetic parse
with known areas."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lib_anydressing.generation.options import GarmentSlot
from lib_anydressing.generation.photo_masks import PhotoMaskError, photo_mask, preview
from lib_anydressing.generation.prepare import region_masks
from lib_anydressing.segment.parser import PART_INDEX

H, W = 40, 30
AREAS = {  # part: (rows, cols) of a person, 30 px wide and 40 high
    "hair": (slice(0, 4), slice(10, 21)),
    "face": (slice(4, 10), slice(11, 20)),
    "upper": (slice(10, 22), slice(8, 23)),
    "belt": (slice(22, 23), slice(8, 23)),
    "lower": (slice(23, 34), slice(9, 22)),
    "legs": (slice(34, 37), slice(9, 22)),
    "shoes": (slice(37, 40), slice(9, 22)),
}


def _parts() -> np.ndarray:
    parts = np.zeros((H, W), np.uint8)
    for name, where in AREAS.items():
        parts[where] = PART_INDEX[name]
    parts[10:22, 4:8] = parts[10:22, 23:27] = PART_INDEX["arms"]
    return parts


def _area(*names: str) -> np.ndarray:
    return np.isin(_parts(), [PART_INDEX[n] for n in names])


def _slot(category: str, index: int, **kw) -> GarmentSlot:
    return GarmentSlot(Image.new("RGB", (8, 8)), category=category, index=index, **kw)


def test_each_garment_gets_the_parts_it_replaces():
    result = photo_mask(_parts(), [_slot("upper", 0), _slot("lower", 1), _slot("shoes", 2)], grow=0)
    upper, lower, shoes = result.regions
    assert np.array_equal(upper, _area("upper", "arms"))
    assert np.array_equal(lower, _area("lower", "legs", "belt"))
    assert np.array_equal(shoes, _area("shoes"))
    assert np.array_equal(result.mask, _area("upper", "arms", "lower", "legs", "belt", "shoes"))
    assert result.mask.sum() == 12 * 15 + 2 * 12 * 4 + 15 + 11 * 13 + 3 * 13 + 3 * 13


def test_dress_replaces_top_and_bottom():
    (dress,) = photo_mask(_parts(), [_slot("dress", 0)], grow=0).regions
    assert np.array_equal(dress, _area("upper", "arms", "lower", "legs", "belt"))


def test_grown_mask_never_takes_face_or_hair_unless_asked():
    (upper,) = photo_mask(_parts(), [_slot("upper", 0)], grow=2).regions
    # a disc of radius 2 (cv2's 5x5 ellipse: the corners off) around the top and arms; face rows 4-9
    assert upper[8, 10] and not upper[7, 10]  # 2 rows above the shoulder, not 3
    assert upper[9, 2] and not upper[8, 2]  # the arm's corner (10, 4): (-1, -2) is in the disc, (-2, -2) not
    assert not upper[_area("face", "hair")].any()
    assert upper[_area("upper", "arms")].all()
    (covering,) = photo_mask(_parts(), [_slot("upper", 0)], grow=2, cover_face_hair=True).regions
    assert covering[9, 15] and covering[8, 15] and not covering[7, 15]  # grown into the chin


def test_missing_area_names_the_garment():
    with pytest.raises(PhotoMaskError, match=r"garment 3 \(hat\): the photo has no hat to replace"):
        photo_mask(_parts(), [_slot("upper", 0), _slot("lower", 1), _slot("hat", 2)])
    person_free = np.zeros((H, W), np.uint8)
    with pytest.raises(PhotoMaskError, match=r"garment 1 \(upper\): the photo has no upper or arms"):
        photo_mask(person_free, [_slot("upper", 0)])
    with pytest.raises(PhotoMaskError, match="no garment has an area"):
        photo_mask(_parts(), [_slot("other", 0)])


def test_a_garment_without_parts_acts_anywhere_in_the_mask():
    result = photo_mask(_parts(), [_slot("upper", 0), _slot("other", 1)], grow=0)
    assert result.regions[1] is None and np.array_equal(result.mask, _area("upper", "arms"))


def test_painted_mask_wins_and_clips_the_regions():
    painted = np.zeros((H, W), bool)
    painted[10:26] = True  # the top and the first rows of the trousers, whole rows (background too)
    result = photo_mask(_parts(), [_slot("upper", 0), _slot("lower", 1)], grow=0, painted=painted)
    assert np.array_equal(result.mask, painted)
    assert np.array_equal(result.regions[0], _area("upper", "arms"))
    lower = _area("lower", "legs", "belt")
    lower[26:] = False
    assert np.array_equal(result.regions[1], lower)
    top_only = np.zeros((H, W), bool)
    top_only[10:22] = True
    with pytest.raises(PhotoMaskError, match=r"garment 2 \(lower\): the painted mask covers none of its area"):
        photo_mask(_parts(), [_slot("upper", 0), _slot("lower", 1)], grow=0, painted=top_only)


def test_box_region_is_kept_and_joins_the_mask():
    result = photo_mask(_parts(), [_slot("upper", 0), _slot("hat", 1, region="box", box=(0.0, 0.0, 0.5, 0.25))], 0)
    box = np.zeros((H, W), bool)
    box[0:10, 0:15] = True
    assert np.array_equal(result.regions[1], box)
    assert np.array_equal(result.mask, _area("upper", "arms") | box)


def test_preview_dims_outside_and_tints_each_region():
    result = photo_mask(_parts(), [_slot("upper", 0), _slot("lower", 1)], grow=0)
    shown = np.asarray(preview(Image.new("RGB", (W, H), (200, 200, 200)), result))
    assert shown.shape == (H, W, 3)
    assert tuple(shown[0, 0]) == (70, 70, 70)  # background: 200 * 0.35
    assert tuple(shown[15, 15]) == (215, 130, 130)  # the top: half grey, half red (230, 60, 60)
    assert tuple(shown[25, 15]) == (130, 160, 215)  # the trousers: half blue (60, 120, 230)


def test_areas_become_latent_regions():
    area = Image.new("L", (128, 192), 0)
    area.paste(255, (0, 96, 64, 192))  # the bottom-left quarter of the frame
    regions = region_masks([_slot("lower", 0, area=area), _slot("other", 1)], (24, 16))
    assert regions[1] is None
    want = np.zeros((24, 16), np.float32)
    want[12:, :8] = 1
    assert np.array_equal(regions[0].numpy(), want)
