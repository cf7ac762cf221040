"""Dress a photo in img2img through the controller, with the img2img surface of A1111 1.10.1 (82a973c0)
mirrored from modules/processing.py (StableDiffusionProcessingImg2Img: init_images, image_mask,
inpainting_mask_invert, inpaint_full_res and the paste_to its init sets, resize_mode) and
modules/images.py (resize_image, for "L" images: no upscaler). The parser is a real one written by the
test; its model output (the label map) is fixed, so every area is known to the pixel."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from PIL import Image
from support.parsers import write_parser
from test_webui_controller import FakeEnv, FakeP, FakeSdModel

from lib_anydressing.generation.infotext import pasted
from lib_anydressing.generation.options import from_api
from lib_anydressing.sd.architectures import TINY_UNET
from lib_anydressing.sd.random_models import build_unet
from lib_anydressing.segment.parser import PARSERS
from lib_anydressing.webui.controller import Controller

W, H = 128, 192  # the photo, and the frame in the whole-picture cases
LABELS = {"Upper-clothes": 4, "Pants": 6, "Face": 11, "Left-arm": 14}


def resize_image(resize_mode, im, width, height, upscaler_name=None):
    """A1111 82a973c0 modules/images.py resize_image for "L" images (which it resizes with LANCZOS, no
    upscaler): 0 just resize, 1 crop and resize, 2 resize and fill; 1 and 2 return RGB."""
    if resize_mode == 0:
        return im.resize((width, height), resample=Image.LANCZOS)
    ratio, src_ratio = width / height, im.width / im.height
    if resize_mode == 1:
        src_w = width if ratio > src_ratio else im.width * height // im.height
        src_h = height if ratio <= src_ratio else im.height * width // im.width
    else:
        src_w = width if ratio < src_ratio else im.width * height // im.height
        src_h = height if ratio >= src_ratio else im.height * width // im.width
    resized = im.resize((src_w, src_h), resample=Image.LANCZOS)
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return res  # (mode 2's edge fill is not reached: the tests keep the aspect)


@dataclass
class Img2ImgP(FakeP):
    init_images: list = field(default_factory=list)
    image_mask: object = None
    inpainting_mask_invert: int = 0
    inpaint_full_res: bool = False
    paste_to: tuple | None = None
    resize_mode: int = 0


class PhotoEnv(FakeEnv):
    def __init__(self, dirs, parser_dirs):
        super().__init__(dirs)
        self.parsers = parser_dirs

    def parser_dirs(self):
        return self.parsers

    def parser_name(self):
        return ""


def _labels() -> np.ndarray:
    labels = np.zeros((H, W), np.int64)
    labels[10:40, 48:80] = LABELS["Face"]
    labels[40:100, 32:96] = LABELS["Upper-clothes"]
    labels[40:100, 16:32] = LABELS["Left-arm"]
    labels[100:170, 36:92] = LABELS["Pants"]
    return labels


def _box(rows, cols) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[rows, cols] = True
    return m


UPPER = _box(slice(40, 100), slice(16, 96))
LOWER = _box(slice(100, 170), slice(36, 92))


@pytest.fixture
def photo_setup(tmp_path, monkeypatch, unet):
    images = types.ModuleType("modules.images")
    images.resize_image = resize_image
    modules = types.ModuleType("modules")
    modules.images = images
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "modules.images", images)
    write_parser(tmp_path / "parser" / "tiny_clothes")
    monkeypatch.setattr(PARSERS, "_loaded", None)
    parser = PARSERS.get([tmp_path / "parser"], "", torch.device("cpu"))
    monkeypatch.setattr(parser, "labels_of", lambda rgb: _labels()[: rgb.height, : rgb.width])
    controller = Controller(PhotoEnv([tmp_path], [tmp_path / "parser"]))
    photo = Image.new("RGB", (W, H), (90, 90, 90))
    return controller, lambda **kw: Img2ImgP(FakeSdModel(unet), init_images=[photo], **kw), unet


def _opts(**general):
    top = Image.new("RGB", (32, 32), (200, 20, 20))
    trousers = Image.new("RGB", (32, 32), (20, 20, 200))
    garments = [{"image": top, "category": "upper"}, {"image": trousers, "category": "lower"}]
    return from_api({"enabled": True, "mask_from_garments": True, "mask_grow": 0, "garments": garments, **general})


def test_mask_and_regions_from_the_photo(photo_setup):
    controller, make_p, unet = photo_setup
    p = make_p()
    opts = _opts()
    controller.process(p, opts)
    assert not p.comments, p.comments
    assert p.image_mask.mode == "L" and np.array_equal(np.asarray(p.image_mask) > 0, UPPER | LOWER)
    assert p.extra_generation_params["AnyDressing mask"] == "from garments, grow 0"
    controller.process_batch(p)  # after A1111's init: the regions go onto the frame
    assert np.array_equal(np.asarray(opts.slots[0].area) > 127, UPPER)
    assert np.array_equal(np.asarray(opts.slots[1].area) > 127, LOWER)
    upper, lower = controller.session.prepared.regions  # at the latent: 8x8 pixels each
    assert upper[5:12, 2:12].all() and not upper[13:21].any()
    assert lower[13:21, 5:11].all() and not lower[:12].any()
    params = {k: str(v) for k, v in p.extra_generation_params.items()}
    back = pasted(params, n_slots=2)  # pasting the image's parameters sets the photo options again
    assert (back["mask_from_garments"], back["mask_grow"], back["mask_face_hair"]) == (True, 0, False)
    assert pasted({**params, "AnyDressing mask": "from garments, grow 12, face and hair"}, 2)["mask_face_hair"]
    del params["AnyDressing mask"]
    assert pasted(params, 2)["mask_from_garments"] is False
    processed = types.SimpleNamespace(images=["image"], infotexts=["info"])
    controller.postprocess(p, processed)
    assert processed.infotexts == ["info", "info"] and processed.images[1].size == (W, H)
    assert controller.session is None and controller.preview is None


def test_only_masked_crops_the_regions_like_the_mask(photo_setup):
    controller, make_p, unet = photo_setup
    p = make_p(inpaint_full_res=True, width=64, height=96)
    opts = _opts()
    controller.process(p, opts)
    p.paste_to = (32, 80, 64, 96)  # what init sets for "Only masked": the crop's x, y, w, h
    controller.process_batch(p)
    assert not p.comments, p.comments
    assert opts.slots[0].area.size == (64, 96) and opts.slots[0].area.mode == "L"
    assert np.array_equal(np.asarray(opts.slots[0].area) > 127, UPPER[80:176, 32:96])
    assert np.array_equal(np.asarray(opts.slots[1].area) > 127, LOWER[80:176, 32:96])
    controller.finish(unet)


def test_painted_mask_wins_and_clips_regions(photo_setup):
    controller, make_p, unet = photo_setup
    painted = Image.new("RGBA", (W, H), (0, 0, 0, 0))  # gradio's sketch layer: strokes opaque
    painted.paste((255, 255, 255, 255), (0, 40, W, 120))
    p = make_p(image_mask=painted)
    opts = _opts()
    controller.process(p, opts)
    controller.process_batch(p)
    assert p.image_mask is painted
    assert p.extra_generation_params["AnyDressing mask"] == "painted, regions from garments"
    assert np.array_equal(np.asarray(opts.slots[1].area) > 127, LOWER & _box(slice(40, 120), slice(0, W)))
    controller.finish(unet)


def test_img2img_batch_parses_each_photo(photo_setup):
    """A1111's img2img batch reuses p: the mask set for the last photo is ours, not the user's."""
    controller, make_p, unet = photo_setup
    p = make_p()
    controller.process(p, _opts())
    controller.finish(unet)
    p.init_images = [Image.new("RGB", (W, 150), (10, 10, 10))]  # another photo: its parse is cut at row 150
    controller.process(p, _opts())
    assert not p.comments, p.comments
    assert np.array_equal(np.asarray(p.image_mask) > 0, (UPPER | LOWER)[:150])
    controller.finish(unet)


def test_no_garment_area_or_no_img2img_is_a_message(photo_setup, tmp_path):
    controller, make_p, unet = photo_setup
    p = make_p()
    opts = _opts()
    opts.slots[1].category = "hat"
    controller.process(p, opts)
    assert any("garment 2 (hat): the photo has no hat to replace" in c for c in p.comments)
    assert controller._pending is None and p.image_mask is None
    txt2img = FakeP(p.sd_model)
    controller.process(txt2img, _opts())
    assert any("works in img2img" in c for c in txt2img.comments)


def test_no_parser_says_what_to_install(photo_setup, tmp_path, monkeypatch):
    controller, make_p, unet = photo_setup
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no_cache"))
    controller.env.parsers = [tmp_path / "empty"]
    p = make_p()
    controller.process(p, _opts())
    assert any("no clothes parser is installed: put a segformer clothes parser" in c for c in p.comments)


def test_inpainting_model_is_dressed(photo_setup):
    controller, make_p, _ = photo_setup
    unet9 = build_unet({**TINY_UNET, "in_channels": 9})
    p = make_p()
    p.sd_model = FakeSdModel(unet9)
    controller.process(p, _opts())
    controller.process_batch(p)
    assert not p.comments, p.comments
    assert controller.session is not None and controller.session.dresser.installed
    controller.finish(unet9)
