"""Segmentation core: a tiny SAM built from segment-anything's own classes, GrabCut, mask tools, outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from lib_anydressing.segment import mask_tools as mt
from lib_anydressing.segment.grabcut import grabcut
from lib_anydressing.segment.outputs import cutout, free_path, square_on_white
from lib_anydressing.segment.sam_models import SamModelError, build_sam, detect_variant, read_state_dict
from lib_anydressing.segment.segmenter import GRABCUT, Segmenter, as_rgb_array


@pytest.fixture(scope="module")
def tiny_sam_file(tmp_path_factory):
    from segment_anything.build_sam import _build_sam

    torch.manual_seed(0)
    sam = _build_sam(32, 2, 1, [1])  # width 32, 2 blocks, block 1 global: the real classes, tiny
    path = tmp_path_factory.mktemp("sam") / "tiny_sam.pth"
    torch.save(sam.state_dict(), path)
    return path


def _scene(h=96, w=128):
    """A red ellipse on a noisy grey background, and its true mask."""
    gen = np.random.default_rng(0)
    image = np.clip(gen.normal(120, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    truth = Image.new("L", (w, h), 0)
    ImageDraw.Draw(truth).ellipse((30, 20, 100, 80), fill=255)
    mask = np.asarray(truth) > 0
    image[mask] = (200, 30, 40)
    return image, mask


@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h"])
def test_variant_from_shapes_not_names(variant):
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        state = sam_model_registry[variant]().state_dict()
    assert detect_variant(state) == variant


def test_tiny_sam_loads_and_caches_the_image_embedding(tiny_sam_file):
    segmenter = Segmenter()
    assert "custom" in segmenter.load(tiny_sam_file)
    calls = []
    segmenter.predictor.predictor.model.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    image, _ = _scene()
    first = segmenter.segment(image, points=[(60, 50)], labels=[1])
    second = segmenter.segment(image, points=[(60, 50), (10, 10)], labels=[1, 0])
    assert len(calls) == 1, "a second click on the same image must not run the image encoder"
    other = image.copy()
    other[0, 0] = 0
    segmenter.segment(other, points=[(60, 50)], labels=[1])
    assert len(calls) == 2
    segmenter.segment(image, box=(30, 20, 100, 80))
    assert len(calls) == 2  # back to the first image: still cached
    for result in (first, second):
        c = result.candidates
        assert c.masks.shape == (3, *image.shape[:2]) and c.scores.shape == (3,)
        assert c.best == int(np.argmax(c.scores)) and np.array_equal(result.mask, c.masks[c.best])
    refined = segmenter.segment(
        image, points=[(60, 50)], labels=[1], previous_logits=first.candidates.low_res_logits[0]
    )
    assert not np.array_equal(refined.candidates.low_res_logits, first.candidates.low_res_logits)


def test_grabcut_fallback_finds_a_clear_object():
    image, truth = _scene()
    segmenter = Segmenter()
    assert segmenter.load(None) == GRABCUT
    for prompts in ({"box": (25, 15, 105, 85)}, {"points": [(65, 50)], "labels": [1]}):
        mask = segmenter.segment(image, **prompts).mask
        iou = (mask & truth).sum() / (mask | truth).sum()
        assert iou >= 0.9, (prompts, iou)


def test_grabcut_on_huge_and_tiny_images():
    image, truth = _scene()
    big = np.kron(image, np.ones((40, 40, 1), dtype=np.uint8))  # 3840 x 5120
    mask = grabcut(big, box=(25 * 40, 15 * 40, 105 * 40, 85 * 40))
    assert mask.shape == big.shape[:2]
    small_truth = mask[::40, ::40]
    assert (small_truth & truth).sum() / (small_truth | truth).sum() >= 0.85
    assert grabcut(np.zeros((1, 1, 3), np.uint8), box=(0, 0, 1, 1)).shape == (1, 1)
    assert not grabcut(image, points=[(5, 5)], labels=[0]).any()  # only a negative click: nothing


@pytest.mark.parametrize(
    "image",
    [
        Image.new("RGBA", (20, 10), (1, 2, 3, 0)),
        Image.new("P", (20, 10), 5),
        Image.fromarray(np.full((10, 20), 40000, dtype=np.uint16)),
        Image.new("L", (20, 10), 7),
        Image.new("CMYK", (20, 10)),
    ],
    ids=["RGBA", "P", "I;16", "L", "CMYK"],
)
def test_any_image_mode_becomes_rgb(image):
    a = as_rgb_array(image)
    assert a.shape == (10, 20, 3) and a.dtype == np.uint8


def test_bad_sam_files_are_refused(tmp_path):
    corrupt = tmp_path / "sam_vit_b.pth"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(SamModelError, match="truncated or not a torch weights file"):
        read_state_dict(corrupt)
    sentinel = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    evil = tmp_path / "evil.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1), "x": Evil()}, evil)
    with pytest.raises(SamModelError, match="refused and not loaded"):
        read_state_dict(evil)
    assert not sentinel.exists()
    notsam = tmp_path / "lora.pth"
    torch.save({"lora_down.weight": torch.zeros(2, 2)}, notsam)
    with pytest.raises(SamModelError, match="not a Segment Anything checkpoint"):
        build_sam(read_state_dict(notsam))


def test_mask_tools_on_known_masks():
    square = np.zeros((21, 21), bool)
    square[8:13, 8:13] = True
    assert mt.dilate(square, 2).sum() > square.sum() and mt.dilate(square, 2)[6, 10]
    assert mt.erode(square, 1).sum() == 9 and not mt.erode(square, 1)[8, 8]
    assert np.array_equal(mt.grow(square, -1), mt.erode(square, 1)) and np.array_equal(mt.grow(square, 0), square)
    ring = mt.dilate(square, 3) & ~square
    assert np.array_equal(mt.fill_holes(ring), mt.dilate(square, 3))
    two = square.copy()
    two[0:2, 0:2] = True
    assert np.array_equal(mt.largest_component(two), square)
    assert not mt.largest_component(np.zeros((4, 4), bool)).any()
    assert np.array_equal(mt.invert(square), ~square)
    big = np.zeros((41, 41), bool)
    big[10:31, 10:31] = True
    soft = mt.feather(big, 4)
    assert soft[20, 20] > 0.99 and 0.3 < soft[20, 10] < 0.7 and soft[20, 2] < 0.01 and soft.max() <= 1
    assert np.array_equal(mt.feather(big, 0), big.astype(np.float32))
    stroke = np.zeros_like(square)
    stroke[0, :] = True
    assert mt.paint(square, stroke, add=True)[0].all() and not mt.paint(square, square, add=False).any()


def test_outputs(tmp_path):
    image, truth = _scene()
    rgba = cutout(image, truth)
    assert rgba.mode == "RGBA" and rgba.size == (71, 61)  # the ellipse's bounding box
    assert rgba.getpixel((0, 0))[3] == 0 and rgba.getpixel((35, 30))[:3] == (200, 30, 40)
    square = square_on_white(rgba, 512)
    assert square.size == (512, 512) and square.getpixel((2, 2)) == (255, 255, 255)
    assert square.getpixel((256, 256)) == (200, 30, 40)
    with pytest.raises(ValueError, match="empty"):
        cutout(image, np.zeros_like(truth))
    first = free_path(tmp_path / "out", "../../etc/passwd")
    first.write_bytes(b"x")
    second = free_path(tmp_path / "out", "../../etc/passwd")
    assert first.parent == second.parent == tmp_path / "out" and first != second
    assert first.name == "etc_passwd.png" and second.name == "etc_passwd-1.png"


def test_session_prompts_undo_and_outputs():
    from lib_anydressing.segment.session import BOX, NEGATIVE, POSITIVE, MaskEdits, SegmentState

    image, truth = _scene()
    st = SegmentState()
    st.set_image(image)
    segmenter = Segmenter()
    st.click(25, 15, BOX)
    assert st.box is None and st.pending_corner == (25, 15)  # first corner only
    st.click(105, 85, BOX)
    assert st.box == (25, 15, 105, 85)
    st.click(65, 50, POSITIVE)
    st.click(5, 5, NEGATIVE)
    assert st.labels == [1, 0]
    result = st.run(segmenter)
    assert result.engine == GRABCUT and (result.mask & truth).sum() / (result.mask | truth).sum() >= 0.9
    st.undo()
    assert st.points == [(65, 50)] and st.box is not None
    st.undo()
    st.undo()
    assert not st.points and st.box is None
    st.click(25, 15, BOX)
    st.click(105, 85, BOX)
    st.run(segmenter)
    edits = MaskEdits(grow=2, fill_holes=True)
    rgba, mask_image, square = st.outputs(edits, 768)
    assert square.size == (768, 768) and mask_image.size == (128, 96)
    assert np.asarray(mask_image).astype(bool).sum() > truth.sum()  # grown by 2 px
    assert rgba.size[0] > 71  # the cutout's box grew with the mask
    overlay = np.asarray(st.overlay(MaskEdits()))
    assert overlay.shape == image.shape and not np.array_equal(overlay, image)
    st.clear()
    assert st.image is not None and st.result is None and st.outputs(MaskEdits(), 512) is None


def test_bench_sam_reports_both_latencies_from_one_run(tiny_sam_file, capsys):
    import json

    from lib_anydressing.__main__ import main

    assert main(["bench-sam", "--json", "--checkpoint", str(tiny_sam_file), "--clicks", "3", "--reencodes", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["encoder_runs"] == 2  # only the re-encoded clicks ran the image encoder
    assert result["click_latency_ms"] > 0 and result["reencode_latency_ms"] > 0 and result["variant"] == "custom"


def test_batch_folder_reports_every_file_and_never_stops(tmp_path):
    from lib_anydressing.segment.batch import Template, segment_folder
    from lib_anydressing.segment.session import MaskEdits

    photos = tmp_path / "photos"
    photos.mkdir()
    image, truth = _scene()
    Image.fromarray(image).save(photos / "a_good.png")
    Image.fromarray(image[:, ::-1]).save(photos / "b_good.jpg", quality=95)
    (photos / "c_corrupt.png").write_bytes(b"\x89PNG not really")
    Image.new("RGB", (1, 1)).save(photos / "d_tiny.png")
    (photos / "e_notes.txt").write_text("hello")
    Image.new("CMYK", (60, 40), (0, 255, 255, 0)).save(photos / "f_cmyk.jpg")
    seen = []
    report = dict(
        segment_folder(
            photos,
            tmp_path / "out",
            Template.largest_object(),
            Segmenter(),
            MaskEdits(),
            256,
            progress=lambda i, n, name: seen.append((i, n)),
        )  # fmt: skip
    )
    assert set(report) == {"a_good.png", "b_good.jpg", "c_corrupt.png", "d_tiny.png", "e_notes.txt", "f_cmyk.jpg"}
    assert report["a_good.png"].startswith("saved") and report["b_good.jpg"].startswith("saved")
    assert report["c_corrupt.png"].startswith("skipped") and report["e_notes.txt"] == "skipped: not an image file"
    assert report["d_tiny.png"].startswith(("saved", "skipped"))
    assert seen[0] == (0, 6) and len(seen) == 6
    mask = np.asarray(Image.open(tmp_path / "out" / "a_good-mask.png")) > 127
    assert (mask & truth).sum() / (mask | truth).sum() >= 0.85
    with pytest.raises(ValueError, match="not a folder"):
        segment_folder(tmp_path / "nope", tmp_path, Template.largest_object(), Segmenter(), MaskEdits())


def test_template_from_clicks_scales_to_other_sizes():
    from lib_anydressing.segment.batch import Template
    from lib_anydressing.segment.session import BOX, POSITIVE, SegmentState

    st = SegmentState()
    with pytest.raises(ValueError, match="click on a photo first"):
        Template.from_state(st)
    st.set_image(np.zeros((100, 200, 3), np.uint8))
    st.click(50, 25, POSITIVE)
    st.click(20, 10, BOX)
    st.click(180, 90, BOX)
    points, labels, box = Template.from_state(st).on(400, 200)
    assert points == [(100.0, 50.0)] and labels == [1] and box == (40.0, 20.0, 360.0, 180.0)


def test_segment_route_over_http(tiny_sam_file):
    import base64
    import io

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_anydressing.segment.api import ROUTE, register

    app = FastAPI()
    register(app, Segmenter(), lambda: [tiny_sam_file.parent], lambda: None)
    client = TestClient(app)
    image, truth = _scene()
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    photo = base64.b64encode(buf.getvalue()).decode()
    answer = client.post(ROUTE, json={"image": photo, "box": [25, 15, 105, 85]})
    assert answer.status_code == 200 and answer.json()["engine"] == GRABCUT
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.json()["mask"])))) > 0
    assert (mask & truth).sum() / (mask | truth).sum() >= 0.9
    sam = client.post(ROUTE, json={"image": photo, "points": [[60, 50]], "model": "tiny_sam.pth"}).json()
    assert sam["engine"].startswith("SAM custom") and len(sam["scores"]) == 3
    outside = f"outside the {image.shape[1]}x{image.shape[0]} image"
    for bad, message in (
        ({"box": [1, 2, 3, 4]}, "'image'"),
        ({"image": "%%%", "box": [1, 2, 3, 4]}, "not valid base64"),
        ({"image": photo}, "give 'points' or a 'box'"),
        ({"image": photo, "points": [[1, 2]], "labels": [3]}, "one label"),
        ({"image": photo, "box": [5, 5, 1, 1]}, "x0 < x1"),
        ({"image": photo, "points": [[60, 50], [5000, 5000]], "labels": [1, 0]}, f"point (5000, 5000) is {outside}"),
        ({"image": photo, "points": [[128, 50]]}, f"point (128, 50) is {outside}"),  # x runs 0..127
        ({"image": photo, "box": [0, 0, 9, 9], "model": "vit_h.pth"}, "no SAM model 'vit_h.pth'"),
    ):
        response = client.post(ROUTE, json=bad)
        assert response.status_code == 422 and message in response.json()["detail"], response.json()


def test_brush_strokes_override_the_mask():
    from lib_anydressing.segment.session import BOX, MaskEdits, SegmentState

    image, truth = _scene()
    st = SegmentState()
    st.set_image(image)
    strokes = np.zeros((48, 64), bool)  # painted on a half-size canvas: scaled to the photo
    strokes[0:5, 0:5] = True
    st.paint(strokes, add=True)
    assert st.mask(MaskEdits())[0:10, 0:10].all() and st.mask(MaskEdits()).sum() == 100  # a mask from the brush alone
    st.click(25, 15, BOX)
    st.click(105, 85, BOX)
    st.run(Segmenter())
    hole = np.zeros_like(truth)
    hole[45:55, 60:70] = True
    st.paint(hole, add=False)
    mask = st.mask(MaskEdits(fill_holes=True))
    assert not mask[45:55, 60:70].any(), "a subtracted stroke wins over fill holes"
    assert mask[0:10, 0:10].all() and mask[30, 65]
    st.paint(hole, add=True)
    assert st.mask(MaskEdits())[45:55, 60:70].all()


def test_8000_square_photo_segments_without_blowing_up():
    image = np.full((8000, 8000, 3), 128, np.uint8)
    image[2000:6000, 2500:5500] = (200, 30, 40)
    mask = Segmenter().segment(image, box=(2300, 1800, 5700, 6200)).mask
    assert mask.shape == (8000, 8000)
    assert mask[4000, 4000] and not mask[100, 100]


@pytest.mark.parametrize(
    "key, variant, package",
    [
        ("mask_decoder.hf_token.weight", "sam_hq", "segment_anything_hq"),
        ("image_encoder.layers.0.x", "mobile_sam", "mobile_sam"),
    ],
)
def test_hq_and_mobile_sam_are_recognised_and_need_their_package(key, variant, package):
    import importlib.util

    state = {key: torch.zeros(1), "image_encoder.pos_embed": torch.zeros(1, 64, 64, 768)}
    assert detect_variant(state) == variant
    if importlib.util.find_spec(package) is None:
        with pytest.raises(SamModelError, match=f"install the '{package}' package"):
            build_sam(state)
