"""Options from the UI and the API, and garment preparation: every bad input becomes a sentence."""

from __future__ import annotations

import base64
import io

import pytest
import torch
from PIL import Image

from lib_anydressing.engine import AnyDressingModel, GarmentLoRA, ModelInfo
from lib_anydressing.engine.garments_net import GarmentFeatures
from lib_anydressing.generation.options import from_api, from_values
from lib_anydressing.generation.prepare import (
    FeatureCache,
    content_key,
    garment_batch,
    garment_canvas,
    lora_slots,
    region_masks,
)


def _b64(image: Image.Image, data_url: bool = False) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    text = base64.b64encode(buf.getvalue()).decode()
    return f"data:image/png;base64,{text}" if data_url else text


def _cutout():
    im = Image.new("RGBA", (60, 80), (0, 0, 0, 0))
    im.paste((10, 200, 10, 255), (10, 10, 50, 70))
    return im


def test_api_dict_with_base64_garments():
    opts = from_api({
        "enabled": True, "model": "training-free", "strength": 0.8, "start": 0.1, "end": 0.9,
        "garments": [
            {"image": _b64(_cutout(), data_url=True), "category": "upper", "weight": 0.7, "region": "mask"},
            {"image": _b64(Image.new("RGB", (40, 40), (0, 0, 255))), "category": "lower", "region": "box",
             "box": [0.0, 0.5, 1.0, 1.0]},
            {"image": None},
        ],
    })  # fmt: skip
    assert opts.problems == [] and opts.usable
    top, bottom = opts.slots
    assert top.mask is not None and top.mask.getpixel((0, 0)) == 0 and top.mask.getpixel((30, 40)) == 255
    assert top.masked_image().getpixel((0, 0)) == (255, 255, 255)  # outside the cutout: white
    assert (top.category, top.weight, bottom.box) == ("upper", 0.7, (0.0, 0.5, 1.0, 1.0))
    assert (opts.strength, opts.start, opts.end) == (0.8, 0.1, 0.9)


@pytest.mark.parametrize(
    "garment, message",
    [
        ({"image": "not base64!"}, "garment 1: the image is not valid base64"),
        ({"image": base64.b64encode(b"hello").decode()}, "garment 1: the data is not an image"),
        ({"image": _b64(Image.new("RGB", (1, 1))), "category": "scarf"}, "category 'scarf' is not one of"),
        ({"image": _b64(Image.new("RGB", (8, 8))), "region": "mask"}, "region 'mask' needs a mask"),
        ({"image": _b64(Image.new("RGB", (8, 8))), "region": "box", "box": [0.5, 0, 0.2, 1]}, "must satisfy"),
        ({"image": _b64(Image.new("RGB", (8, 8))), "weight": "heavy"}, "garment 1 weight must be a number"),
        ({"image": _b64(Image.new("RGB", (80, 40))), "mask": _b64(Image.new("L", (40, 80)))}, "mask is 40x80 but"),
        ({"image": _b64(Image.new("RGB", (8, 8))), "colour": "red"}, "unknown fields ['colour']"),
        ({"image": _b64(Image.new("RGB", (3, 500)))}, "garment 1: the image is 3x500: more than 32 times as long"),
    ],
)
def test_bad_garments_are_named(garment, message):
    opts = from_api({"enabled": True, "garments": [garment]})
    assert not opts.usable
    assert any(message in p for p in opts.problems), opts.problems


def test_bad_general_values():
    opts = from_api(
        {"enabled": True, "strength": "x", "start": 0.8, "end": 0.2, "resolution": 20, "detail": 9, "fine_pool": 3,
         "sampler": 1}
    )  # fmt: skip
    joined = " | ".join(opts.problems)
    expected = (
        "strength must be a number", "range is empty", "garment resolution 20 is below 128", "sampler",
        "garment detail 9.0 is outside 0.25..4.0", "fine-layer pooling 3 is not one of 1, 2, 4",
    )  # fmt: skip
    for part in expected:
        assert part in joined


def test_enabled_without_garments_is_not_usable_but_not_an_error():
    opts = from_values({"enabled": True}, [{"image": None}, {}])
    assert opts.problems == [] and not opts.usable


def test_mask_of_same_shape_other_size_is_resized():
    opts = from_values(
        {"enabled": True}, [{"image": Image.new("RGB", (80, 40)), "mask": Image.new("L", (40, 20), 255)}]
    )
    assert opts.problems == [] and opts.slots[0].mask.size == (80, 40)


def test_garment_canvas_with_a_resolution_keeps_aspect_in_multiples_of_64():
    one = _slots(1)
    assert garment_canvas((512, 768), one, 512) == (320, 512)
    assert garment_canvas((768, 512), one, 384) == (384, 256)
    assert garment_canvas((64, 4096), one, 128) == (64, 128)


def _slots(n: int, boxes=None):
    boxes = boxes or [None] * n
    values = [{"image": Image.new("RGB", (8, 8)), **({"region": "box", "box": b} if b else {})} for b in boxes]
    return from_values({"enabled": True}, values).slots


@pytest.mark.parametrize(
    ("target", "n", "detail", "canvas"),
    [
        ((512, 768), 1, 1.0, (512, 768)),  # one garment may cover the whole image
        ((512, 768), 2, 1.0, (384, 512)),  # half each: 362x543 px; 384x512 is exactly half
        ((512, 768), 4, 1.0, (256, 384)),  # a quarter each
        ((512, 768), 2, 2.0, (512, 768)),  # detail 2: twice the pixels
        ((256, 256), 2, 1.0, (128, 192)),  # 181 px a side: 128x128 or 192x192 miss, 128x192 fits
        ((1024, 1024), 2, 1.0, (704, 704)),  # SDXL size: 724 px a side, 768x704 would be over
        ((256, 384), 2, 1.0, (192, 256)),  # the bench's size: 181x271 px
        ((128, 128), 4, 0.25, (64, 64)),  # never below one 64-pixel block
    ],
)
def test_token_budget_ties_the_canvas_to_the_image(target, n, detail, canvas):
    assert garment_canvas(target, _slots(n), 0, detail) == canvas
    if canvas != (64, 64):  # the budget: all garments together at most the image's pixels times detail
        assert n * canvas[0] * canvas[1] <= target[0] * target[1] * detail


def test_token_budget_of_garments_with_regions_is_the_area_they_cover():
    slots = _slots(2, [[0, 0, 1, 0.5], [0.4, 0, 0.6, 0.1]])  # a top on the upper half, a hat on 2% of the image
    w, h = garment_canvas((512, 768), slots)
    assert (w, h) == (256, 384)  # together 52% of 512x768 = 204472 px: 2 x 261x392 px; 320 or 448 is over
    assert 2 * w * h <= 0.52 * 512 * 768


def test_region_masks_and_batch():
    opts = from_values(
        {"enabled": True},
        [
            {"image": _cutout(), "region": "mask"},
            {"image": Image.new("RGB", (10, 10)), "region": "box", "box": [0, 0.5, 0.5, 1]},
            {"image": Image.new("RGB", (10, 10))},
        ],
    )
    masks = region_masks(opts.slots, (8, 6))
    assert masks[2] is None
    assert masks[1].sum() == 4 * 3 and masks[1][4:, :3].min() == 1
    assert masks[0].shape == (8, 6) and 0 < masks[0].mean() < 1
    batch = garment_batch(opts.slots, (64, 128))
    assert batch.shape == (3, 3, 128, 64) and batch.min() >= -1 and batch.max() <= 1


def test_lora_slot_choice_follows_categories():
    dims = {"input_blocks.1.1.transformer_blocks.0": (8, 8)}
    model = AnyDressingModel(ModelInfo(slots=["upper", "lower"]), lora=GarmentLoRA(dims, 3, 2, 2.0))
    opts = from_values({}, [{"image": Image.new("RGB", (8, 8)), "category": c} for c in ("lower", "hat", "upper")])
    assert lora_slots(model, opts.slots) == [1, 2, 0]
    assert lora_slots(AnyDressingModel.training_free(), opts.slots) is None


def test_content_key_and_feature_cache():
    a = from_values({}, [{"image": Image.new("RGB", (8, 8), (1, 2, 3))}]).slots
    b = from_values({}, [{"image": Image.new("RGB", (8, 8), (1, 2, 4))}]).slots
    assert content_key(a, "m", 512) == content_key(a, "m", 512)
    assert len({content_key(a, "m", 512), content_key(b, "m", 512), content_key(a, "m", 384)}) == 3
    assert content_key(a, torch.zeros(2)) != content_key(a, torch.ones(2))
    cache = FeatureCache(max_entries=2)
    feats = [GarmentFeatures({}, 1) for _ in range(3)]
    for i, f in enumerate(feats):
        cache.put(str(i), f)
    assert cache.get("0") is None and cache.get("2") is feats[2]
    cache.get("1")
    cache.put("3", feats[0])
    assert cache.get("2") is None and cache.get("1") is feats[1]


@pytest.mark.parametrize(
    "value, enabled",
    [(True, True), (False, False), ("false", False), ("False", False), ("no", False), ("0", False), (0, False),
     ("true", True), ("yes", True), ("1", True), (1, True), (None, False)],
)  # fmt: skip
def test_enabled_is_read_strictly(value, enabled):
    """JSON clients send strings too: bool("false") would turn dressing on."""
    opts = from_api({"enabled": value, "garments": [{"image": _b64(Image.new("RGB", (8, 8)))}]})
    assert opts.enabled is enabled and not opts.problems


@pytest.mark.parametrize("value", ["maybe", "", 2, 0.5, [], "off!"])
def test_unreadable_enabled_is_a_problem_not_a_guess(value):
    opts = from_api({"enabled": value, "garments": [{"image": _b64(Image.new("RGB", (8, 8)))}]})
    assert opts.enabled and not opts.usable  # on, so the WebUI shows the message, and goes on without dressing
    assert opts.problems == [f"enabled must be true or false, not {value!r}"]


def test_positional_garment_guidance_switch_is_read_strictly():
    from lib_anydressing.generation.options import from_script_args, script_arg_names

    values = dict.fromkeys(script_arg_names(1))
    values.update(enabled="true", garment_guidance=3.0, slot0_image=Image.new("RGB", (8, 8)), slot0_weight=1.0)
    for switch, guidance in (("false", None), ("0", None), ("true", 3.0), ("yes", 3.0)):
        values["garment_guidance_enabled"] = switch
        opts = from_script_args([values[n] for n in script_arg_names(1)], 1)
        assert opts.usable and opts.garment_guidance == guidance
    values["garment_guidance_enabled"] = "sure"
    opts = from_script_args([values[n] for n in script_arg_names(1)], 1)
    assert not opts.usable and opts.problems == ["garment guidance enabled must be true or false, not 'sure'"]
