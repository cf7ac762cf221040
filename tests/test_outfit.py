"""Split outfit: garment cutouts from a parse with known areas (exact crops and alpha), through the tab's
handlers (slot i gets garment i and its category) and the HTTP route with a real parser folder."""

from __future__ import annotations

import base64
import io

import gradio as gr
import numpy as np
import pytest
from PIL import Image
from support.parsers import write_parser

from lib_anydressing.segment.outfit import split_outfit
from lib_anydressing.segment.parser import PART_INDEX, GarmentParser
from lib_anydressing.segment.session import SegmentState
from lib_anydressing.tabs.split_outfit import OutfitTarget, SplitHandlers

H, W = 60, 40


def _parts() -> np.ndarray:
    parts = np.zeros((H, W), np.uint8)
    parts[5:12, 15:25] = PART_INDEX["face"]
    parts[12:30, 10:30] = PART_INDEX["upper"]
    parts[12:30, 6:10] = PART_INDEX["arms"]
    parts[30:31, 10:30] = PART_INDEX["belt"]
    parts[31:50, 12:28] = PART_INDEX["lower"]
    parts[52:56, 12:18] = parts[52:56, 22:28] = PART_INDEX["shoes"]  # a pair: two pieces
    parts[2, 2] = parts[40, 35] = PART_INDEX["upper"]  # parse specks
    parts[0, 39] = PART_INDEX["bag"]  # a one-pixel "bag": under min_fraction
    return parts


def _photo() -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8))


def test_each_garment_cut_out_with_its_category():
    photo = _photo()
    pieces = split_outfit(photo, _parts(), pad=2)
    assert [p.category for p in pieces] == ["upper", "lower", "shoes"]
    top, bottom, shoes = pieces
    assert top.box == (8, 10, 32, 32)  # rows 12-29, cols 10-29, 2 px around; specks and arms left out
    assert bottom.box == (8, 28, 32, 52)  # the belt (row 30, as wide as the top) joins the bottom
    assert shoes.box == (10, 50, 30, 58)  # both shoes
    rgba = np.asarray(top.cutout)
    assert rgba.shape == (22, 24, 4)
    assert np.array_equal(rgba[..., :3], np.asarray(photo)[10:32, 8:32])
    want = np.zeros((22, 24), np.uint8)
    want[2:20, 2:22] = 255
    assert np.array_equal(rgba[..., 3], want)
    assert top.fraction == pytest.approx(18 * 20 / (H * W))


def test_nothing_found_on_a_photo_without_clothes():
    assert split_outfit(_photo(), np.zeros((H, W), np.uint8)) == []
    with pytest.raises(ValueError, match="the parse is 40x59"):
        split_outfit(_photo(), np.zeros((H - 1, W), np.uint8))


@pytest.fixture
def parser(tmp_path, monkeypatch):
    """A real parser folder; its model's label map is fixed to the areas above (ATR ids)."""
    parser = GarmentParser(write_parser(tmp_path / "clothes"))
    atr = {"background": 0, "face": 11, "upper": 4, "arms": 14, "belt": 8, "lower": 6, "shoes": 9, "bag": 16}
    ids = {PART_INDEX[part]: label for part, label in atr.items()}
    monkeypatch.setattr(parser, "labels_of", lambda rgb: np.vectorize(ids.get)(_parts()))
    return parser


def test_split_and_send_all_to_one_tabs_slots(parser):
    targets = [OutfitTarget("txt2img garment slots", ["i0", "i1"], ["c0", "c1"]),
               OutfitTarget("img2img garment slots", ["j0", "j1", "j2", "j3"], ["d0", "d1", "d2", "d3"])]  # fmt: skip
    handlers = SplitHandlers(lambda: parser, targets)
    st = SegmentState()
    assert "Upload a photo" in handlers.split(st)[2]
    st.set_image(np.asarray(_photo()))
    pieces, gallery, status = handlers.split(st)
    assert [caption for _, caption in gallery] == ["1: upper", "2: lower", "3: shoes"]
    assert status == "3 garments: upper, lower, shoes"
    updates = handlers.send(pieces, "img2img garment slots")
    txt2img, img2img, note = updates[:4], updates[4:12], updates[12]
    assert all(u == gr.update() for u in txt2img)  # the other tab keeps its garments
    assert img2img[:3] == [p.cutout for p in pieces] and img2img[3] is None  # slot 4 emptied
    assert [u["value"] for u in img2img[4:7]] == ["upper", "lower", "shoes"]
    assert note == "Sent 3 garments to img2img garment slots."
    short = handlers.send(pieces, "txt2img garment slots")
    assert short[:2] == [p.cutout for p in pieces[:2]] and "1 left out: 2 slots" in short[-1]


def test_split_route_over_http(parser, tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_anydressing.segment.api import SPLIT_ROUTE, register
    from lib_anydressing.segment.parser import ParserError

    app = FastAPI()
    register(app, None, lambda: [], lambda: parser)
    client = TestClient(app)
    buffer = io.BytesIO()
    _photo().save(buffer, format="PNG")
    photo = base64.b64encode(buffer.getvalue()).decode()
    answer = client.post(SPLIT_ROUTE, json={"image": photo})
    assert answer.status_code == 200, answer.text
    garments = answer.json()["garments"]
    assert [(g["category"], g["box"]) for g in garments] == [
        ("upper", [6, 8, 34, 34]), ("lower", [6, 26, 34, 54]), ("shoes", [8, 48, 32, 60])]  # fmt: skip
    cutout = Image.open(io.BytesIO(base64.b64decode(garments[0]["image"])))
    assert cutout.mode == "RGBA" and cutout.size == (28, 26)
    assert client.post(SPLIT_ROUTE, json={}).status_code == 422

    def missing():
        raise ParserError("no clothes parser is installed: put one in models/parser")

    lonely = FastAPI()
    register(lonely, None, lambda: [], missing)
    refused = TestClient(lonely).post(SPLIT_ROUTE, json={"image": photo})
    assert refused.status_code == 422 and "no clothes parser is installed" in refused.json()["detail"]
