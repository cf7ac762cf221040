"""Garment LoRA dataset: import with a line per file, background removal, framing, captions, the tagger."""

from __future__ import annotations

import importlib.util
import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from lib_anydressing.garment_lora import captions as cap
from lib_anydressing.garment_lora.dataset import (
    BG_KEEP,
    BG_SEGMENT,
    ImportOptions,
    dataset_images,
    folder_sources,
    import_images,
)
from lib_anydressing.garment_lora.tagger import Label, TaggerError, WD14Tagger, postprocess, preprocess, readable
from lib_anydressing.segment.segmenter import Segmenter


def _caption(_picture) -> str:
    return "zxq, shirt"


def _garment_photo(w=128, h=96, box=(30, 20, 100, 80)):
    """A red ellipse on a noisy grey background, and its true mask."""
    image = np.clip(np.random.default_rng(0).normal(120, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    truth = Image.new("L", (w, h), 0)
    ImageDraw.Draw(truth).ellipse(box, fill=255)
    mask = np.asarray(truth) > 0
    image[mask] = (200, 30, 40)
    return image, mask


def test_bad_files_are_reported_one_by_one_and_never_stop_the_import(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(ValueError, match="no files"):
        folder_sources(src)
    Image.new("RGB", (100, 80), (200, 0, 0)).save(src / "a_good.png")
    (src / "b_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    Image.new("RGB", (1, 1), (1, 2, 3)).save(src / "c_tiny.png")
    Image.new("1", (9000, 8000), 1).save(src / "d_huge.png")
    Image.new("CMYK", (90, 70), (0, 255, 255, 0)).save(src / "e_cmyk.jpg")
    (src / "f_notes.doc").write_text("not a picture")
    Image.fromarray(np.arange(80 * 90, dtype=np.uint16).reshape(80, 90) * 9).save(src / "g_16bit.png")
    (src / "a_good.txt").write_text("ignored: captions of the source are not images")

    out = tmp_path / "dataset"
    options = ImportOptions(size=64, background=BG_KEEP)
    report = import_images(folder_sources(src), out, options, Segmenter(), _caption)
    rows = {r.name: r.result for r in report}
    assert list(rows) == ["a_good.png", "b_corrupt.png", "c_tiny.png", "d_huge.png", "e_cmyk.jpg", "f_notes.doc",
                          "g_16bit.png"]  # fmt: skip
    assert rows["a_good.png"].startswith("imported as 001.png")
    assert rows["b_corrupt.png"].startswith("skipped: unreadable")
    assert rows["c_tiny.png"] == "skipped: too small (1x1; the minimum side is 64 px)"
    assert rows["d_huge.png"] == "skipped: 9000x8000 is larger than 64 MP"
    assert rows["e_cmyk.jpg"].startswith("imported as 002.png")
    assert rows["f_notes.doc"] == "skipped: not an image file (.doc)"
    assert rows["g_16bit.png"].startswith("imported as 003.png")
    assert [p.name for p in dataset_images(out)] == ["001.png", "002.png", "003.png"]
    assert (out / "002.txt").read_text() == "zxq, shirt\n"
    cmyk = np.asarray(Image.open(out / "002.png"))
    assert cmyk.shape == (64, 64, 4)
    assert tuple(cmyk[32, 32]) == pytest.approx((255, 0, 0, 255), abs=3)  # CMYK (0,255,255,0) is red

    again = import_images([src / "a_good.png"], out, options, Segmenter(), _caption)
    assert again[0].result.startswith("imported as 004.png"), "a second import continues the numbering"


def test_a_phone_photo_is_imported_upright(tmp_path):
    photo = Image.new("RGB", (120, 80), (255, 255, 255))
    photo.paste((255, 0, 0), (0, 0, 40, 80))  # stored: red on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned, show it rotated 90 degrees clockwise
    photo.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    options = ImportOptions(size=80, margin=0.0, background=BG_KEEP)
    report = import_images([tmp_path / "phone.jpg"], tmp_path / "ds", options, Segmenter(), _caption)
    saved = np.asarray(Image.open(report[0].saved)).astype(int)
    assert saved.shape == (80, 80, 4)
    top, bottom = saved[5, 40, :3], saved[75, 40, :3]  # upright it is 80 wide, 120 tall: red on top
    assert top[0] > 200 and top[1] < 60 and bottom.min() > 200, (top, bottom)


def test_existing_alpha_is_kept_exactly_and_the_segmenter_is_not_used(tmp_path):
    rgba = np.zeros((60, 100, 4), np.uint8)
    rgba[..., :3] = (10, 200, 30)
    alpha = Image.new("L", (100, 60), 0)
    ImageDraw.Draw(alpha).ellipse((20, 10, 60, 40), fill=255)
    soft = np.asarray(alpha).astype(np.uint8) // 2 + (np.asarray(alpha) > 0) * 100  # not binary: 227 inside
    soft[25, 40] = 7  # one odd value that must survive
    rgba[..., 3] = soft
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cut.png")

    class NoSegmenter(Segmenter):
        def segment(self, *a, **k):
            raise AssertionError("an image with alpha must not be segmented")

    ys, xs = np.nonzero(soft)
    side = max(ys.ptp() + 1, xs.ptp() + 1)  # margin 0 and size = side: no resampling
    options = ImportOptions(size=int(side), margin=0.0, min_side=16)
    report = import_images([tmp_path / "cut.png"], tmp_path / "ds", options, NoSegmenter(), _caption)
    assert "kept its alpha" in report[0].result
    saved = np.asarray(Image.open(report[0].saved))
    top = ys.min() - (side - (ys.ptp() + 1)) // 2
    expected = np.zeros((side, side), np.uint8)
    expected[ys.min() - top : ys.max() + 1 - top, :] = soft[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    assert np.array_equal(saved[..., 3], expected)
    assert (saved[expected == 0][:, :3] == 255).all(), "transparent pixels are white"
    assert (saved[expected > 0][:, :3] == (10, 200, 30)).all(), "the garment's colours are untouched"


def test_grabcut_removes_the_background_when_there_is_no_alpha(tmp_path):
    photo, truth = _garment_photo()
    Image.fromarray(photo).save(tmp_path / "photo.png")
    options = ImportOptions(size=71, margin=0.0, background=BG_SEGMENT)  # the ellipse is 71 x 61
    report = import_images([tmp_path / "photo.png"], tmp_path / "ds", options, Segmenter(), _caption)
    assert "GrabCut" in report[0].result, report[0].result
    alpha = np.asarray(Image.open(report[0].saved))[..., 3] > 0
    ys, xs = np.nonzero(truth)
    framed = np.zeros((71, 71), bool)
    top = ys.min() - (71 - (ys.ptp() + 1)) // 2
    framed[ys.min() - top : ys.max() + 1 - top] = truth[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    iou = (alpha & framed).sum() / (alpha | framed).sum()
    assert iou > 0.9, iou


def test_sam_largest_object_is_used_when_a_sam_model_is_loaded(tmp_path):
    from segment_anything import SamPredictor
    from segment_anything.build_sam import _build_sam

    torch.manual_seed(0)
    sam_path = tmp_path / "tiny_sam.pth"
    torch.save(_build_sam(32, 2, 1, [1]).state_dict(), sam_path)
    segmenter = Segmenter()
    segmenter.load(sam_path)
    photo, _ = _garment_photo()
    Image.fromarray(photo).save(tmp_path / "photo.png")

    predictor = SamPredictor(segmenter.predictor.predictor.model)  # the reference: SAM's own predictor
    predictor.set_image(photo)
    box = np.array([0.03 * 128, 0.03 * 96, 0.97 * 128, 0.97 * 96])
    masks, scores, _ = predictor.predict(box=box, multimask_output=True)
    best = masks[int(np.argmax(scores))].astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(best, connectivity=8)
    largest = labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA])) if count > 1 else best > 0
    ys, xs = np.nonzero(largest)
    side = max(ys.ptp() + 1, xs.ptp() + 1) if len(ys) else 64
    options = ImportOptions(size=int(side), margin=0.0, min_side=16)  # no resampling: exact comparison
    report = import_images([tmp_path / "photo.png"], tmp_path / "ds", options, segmenter, _caption)
    if not largest.any():  # random weights may find nothing: then the file must say so
        assert report[0].result == "skipped: no garment found: the mask is empty"
        return
    assert "SAM" in report[0].result, report[0].result
    alpha = np.asarray(Image.open(report[0].saved))[..., 3]
    top, left = ys.min() - (side - (ys.ptp() + 1)) // 2, xs.min() - (side - (xs.ptp() + 1)) // 2
    framed = np.pad(largest, side)[top + side : top + 2 * side, left + side : left + 2 * side]
    assert np.array_equal(alpha > 0, framed)


def test_whole_photo_and_aspect_buckets(tmp_path):
    Image.new("RGB", (200, 90), (0, 0, 255)).save(tmp_path / "wide.png")
    options = ImportOptions(size=128, margin=0.0, square=False, background=BG_KEEP)
    report = import_images([tmp_path / "wide.png"], tmp_path / "ds", options, Segmenter(), _caption)
    saved = np.asarray(Image.open(report[0].saved))
    assert saved.shape == (64, 128, 4), "long side 128, short side 58 padded up to 64"
    assert (saved[:, 64, 3] > 127).sum() == 58
    assert saved[0, 64, 3] == 0 and saved[32, 64, 3] == 255, "padding is transparent, the photo opaque"
    square = import_images([tmp_path / "wide.png"], tmp_path / "sq", ImportOptions(size=100, margin=0.0,
                           background=BG_KEEP), Segmenter(), _caption)  # fmt: skip
    a = np.asarray(Image.open(square[0].saved))[..., 3]
    assert a.shape == (100, 100) and (a[:, 50] > 127).sum() == pytest.approx(45, abs=1)


def test_caption_edits_on_tags_not_substrings():
    assert cap.template_caption("zxq", "shirt", ["shirt", "long sleeves", "zxq"]) == "zxq, shirt, long sleeves"
    text = "zxq, shirt, red, red dress"
    assert cap.add_tag(text, "striped") == "zxq, shirt, red, red dress, striped"
    assert cap.add_tag(text, "red") == text
    assert cap.add_tag(text, "photo, red", front=True) == "photo, zxq, shirt, red, red dress"
    assert cap.remove_tag(text, "red") == "zxq, shirt, red dress"
    assert cap.replace_tag(text, "red", "blue") == "zxq, shirt, blue, red dress"
    assert cap.replace_tag(text, "red", "shirt") == "zxq, shirt, red dress", "duplicates merge"
    assert cap.replace_tag(text, "red", "") == "zxq, shirt, red dress"
    assert cap.split_tags(" a ,, b\nc ") == ["a", "b", "c"]


def test_batch_edits_and_tag_counts_on_a_folder(tmp_path):
    texts = ["zxq, shirt, white background", "zxq, shirt, long sleeves, white background", "zxq, shirt, hood"]
    for i, text in enumerate(texts):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i + 1:03d}.png")
        (tmp_path / f"{i + 1:03d}.txt").write_text(text)
    assert dict(cap.tag_counts(texts)) == {"zxq": 3, "shirt": 3, "white background": 2, "long sleeves": 1, "hood": 1}
    assert cap.edit_all(tmp_path, lambda t: cap.remove_tag(t, "white background")) == 2
    assert cap.edit_all(tmp_path, lambda t: cap.replace_tag(t, "hood", "hoodie")) == 1
    assert cap.edit_all(tmp_path, lambda t: cap.add_tag(t, "photo")) == 3
    assert [p.read_text() for p in sorted(tmp_path.glob("*.txt"))] == [
        "zxq, shirt, photo\n",
        "zxq, shirt, long sleeves, photo\n",
        "zxq, shirt, hoodie, photo\n",
    ]
    meta = json.loads(cap.ss_tag_frequency(tmp_path))
    assert meta == {tmp_path.name: {"zxq": 3, "shirt": 3, "photo": 3, "long sleeves": 1, "hoodie": 1}}
    assert cap.read_caption(tmp_path / "missing.png") == ""


def _tag_folder(tmp_path):
    rows = ["tag_id,name,category,count", "1,general,9,10", "2,long_sleeves,0,5", "3,^_^,0,4", "4,shirt,0,9",
            "5,hatsune_miku,4,3", "6,white_background,0,8"]  # fmt: skip
    (tmp_path / "selected_tags.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_tagger_label_postprocessing():
    labels = [Label("general", 9), Label("long_sleeves", 0), Label("^_^", 0), Label("shirt", 0),
              Label("hatsune_miku", 4), Label("white_background", 0)]  # fmt: skip
    probs = np.array([0.99, 0.5, 0.6, 0.9, 0.95, 0.2], np.float32)
    assert postprocess(probs, labels, 0.35) == ["shirt", "^_^", "long sleeves"]
    assert postprocess(probs, labels, 0.1, exclude=frozenset({"shirt"})) == ["^_^", "long sleeves", "white background"]
    assert readable("o_o") == "o_o" and readable("a_line_skirt") == "a line skirt"
    with pytest.raises(TaggerError, match="gives 5 scores"):
        postprocess(probs[:5], labels)


def test_tagger_input_is_bgr_on_a_white_square():
    im = Image.new("RGBA", (20, 10), (0, 0, 0, 0))
    im.paste((255, 0, 0, 255), (0, 0, 20, 10))
    x = preprocess(im, 20)
    assert x.shape == (1, 20, 20, 3) and x.dtype == np.float32
    assert tuple(x[0, 10, 10]) == (0.0, 0.0, 255.0), "red in RGB is the last channel in BGR"
    assert tuple(x[0, 1, 10]) == (255.0, 255.0, 255.0), "padding is white"


def test_tagger_files_and_runtime_are_checked_with_a_reason(tmp_path):
    with pytest.raises(TaggerError, match="model.onnx or selected_tags.csv"):
        WD14Tagger(tmp_path)
    _tag_folder(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"not onnx")
    tagger = WD14Tagger(tmp_path)
    assert [lab.name for lab in tagger.labels][:2] == ["general", "long_sleeves"]
    with pytest.raises(TaggerError, match="onnxruntime"):
        tagger.session()
    make, note = cap.captioner("zxq", "shirt", str(tmp_path))
    assert "tagger cannot run" in note and make(None) == "zxq, shirt"
    assert cap.captioner("zxq", "shirt", "")[0](None) == "zxq, shirt"
    (tmp_path / "selected_tags.csv").write_text("a,b\n1,2\n")
    with pytest.raises(TaggerError, match="not a WD14 tag list"):
        WD14Tagger(tmp_path)


@pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None,
    reason="onnx and onnxruntime are not installed (the extension never installs them)",
)
def test_tagger_runs_a_real_onnx_model(tmp_path):
    """A 6-label 'tagger' made with onnx: scores = sigmoid(mean over pixels of the B, G, R channels . W)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.zeros((3, 6), np.float32)
    w[2, 3] = 0.05  # red (channel 2 in BGR) drives "shirt"
    w[0, 1] = 0.05  # blue drives "long_sleeves"
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2], keepdims=0),
        helper.make_node("MatMul", ["m", "w"], ["z"]),
        helper.make_node("Sub", ["z", "c"], ["zc"]),
        helper.make_node("Sigmoid", ["zc"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "tagger",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32, 32, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 6])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([6.0], np.float32), "c")],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "model.onnx")
    _tag_folder(tmp_path)
    red = Image.new("RGB", (40, 40), (255, 0, 0))
    assert WD14Tagger(tmp_path).tags(red) == ["shirt"]
