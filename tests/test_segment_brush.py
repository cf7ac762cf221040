"""The Segment tab's Brush on both WebUIs' gradio: A1111's 3.41 (Image with tool="sketch") and Forge's 4.40
(ImageEditor; gradio 4 has no `tool`). One function, strokes_mask, reads both values.

The values are built as each gradio's preprocess hands them to a handler: gradio 3.41.2
components/image.py `Image.preprocess` (sketch: {"image", "mask"}, the mask's RGBA alpha merged into RGB,
so painted pixels are white); gradio 4.40.0 components/image_editor.py `ImageEditor.preprocess`
({"background", "layers", "composite"}, each converted to image_mode, RGBA here). Where gradio 4 is not
the installed gradio, the gradio-4 checks run in the interpreter named by ANYDRESSING_GRADIO4_PYTHON.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio")

import gradio4_env as g4  # noqa: E402

from lib_anydressing.segment.session import MaskEdits, SegmentState  # noqa: E402
from lib_anydressing.tabs import segment_tab  # noqa: E402
from lib_anydressing.tabs.segment_tab import apply_strokes, strokes_mask  # noqa: E402

GRADIO_4 = int(gr.__version__.split(".")[0]) >= 4
EDITS = [0, 0, False, False, False, "best", 512]  # grow, feather, fill, largest, invert, choice, size


def _state() -> SegmentState:
    st = SegmentState()
    st.set_image(g4.photo())
    return st


def _sketch_mask(layer: np.ndarray) -> np.ndarray:
    """gradio 3.41.2 Image.preprocess on the sketch's RGBA mask: `alpha_data = mask_im.getchannel("A")`,
    `_Image.merge("RGB", [alpha_data] * 3)`, then np.array (type numpy)."""
    return np.repeat(layer[..., 3:], 3, axis=2)


def test_strokes_from_a_gradio_3_sketch_value():
    layer, painted = g4.stroke_layer(g4.PHOTO)
    value = {"image": g4.photo(), "mask": _sketch_mask(layer)}
    assert np.array_equal(strokes_mask(value), painted)
    assert np.array_equal(strokes_mask({"image": g4.photo(), "mask": layer[..., 3]}), painted)  # an "L" mask


def test_strokes_from_a_gradio_4_editor_value():
    first, painted = g4.stroke_layer(g4.PHOTO)
    second = np.zeros_like(first)
    second[0:3, 0:3] = (0, 0, 0, 255)  # black strokes count: alpha says what is painted, not colour
    background = np.dstack([g4.photo(), np.full(g4.PHOTO[::-1], 255, np.uint8)])
    value = {"background": background, "layers": [first, second], "composite": background}
    expected = painted.copy()
    expected[0:3, 0:3] = True
    assert np.array_equal(strokes_mask(value), expected)
    assert np.array_equal(strokes_mask({**value, "layers": [Image.fromarray(first)]}), painted)  # type="pil"


@pytest.mark.parametrize(
    "value",
    [
        None,
        {},
        "not a canvas value",
        {"image": g4.photo(), "mask": None},
        {"image": g4.photo(), "mask": np.zeros((*g4.PHOTO[::-1], 3), np.uint8)},
        {"background": None, "layers": [], "composite": None},
        {"background": g4.photo(), "layers": None, "composite": None},
        {"background": g4.photo(), "layers": [np.zeros((*g4.PHOTO[::-1], 4), np.uint8)], "composite": None},
    ],
    ids=["none", "empty", "str", "g3-no-mask", "g3-blank", "g4-empty", "g4-layers-none", "g4-blank"],
)
def test_nothing_painted_is_none(value):
    assert strokes_mask(value) is None


def test_strokes_need_a_photo_and_its_shape():
    layer, painted = g4.stroke_layer(g4.PHOTO)
    value = {"background": None, "layers": [layer], "composite": None}
    assert "no photo to paint on" in apply_strokes(SegmentState(), value, add=True)
    st = _state()
    assert "no brush strokes" in apply_strokes(st, {"background": None, "layers": [], "composite": None}, True)
    assert "on a blank canvas" in apply_strokes(st, value, add=True)  # gradio 4: painted before loading
    square, _ = g4.stroke_layer((30, 30))
    message = apply_strokes(st, {"background": g4.photo()[:, :30], "layers": [square]}, add=True)
    assert message == f"the brush canvas is 30x30, the photo 40x30: press '{segment_tab.LOAD_PREVIEW}' and paint again."
    assert st.mask(MaskEdits()) is None, "a refused stroke changes nothing"
    assert apply_strokes(st, {"background": g4.photo(), "layers": [layer]}, add=True) is None
    assert np.array_equal(st.mask(MaskEdits()), painted)
    big = np.kron(layer, np.ones((3, 3, 1), np.uint8))  # the same canvas at 3x: scaled to the photo
    assert apply_strokes(st, {"image": None, "mask": _sketch_mask(big)}, add=False) is None
    assert not st.mask(MaskEdits()).any()


@pytest.mark.skipif(GRADIO_4, reason="gradio 3 (A1111's) is not the installed gradio")
def test_gradio_3_sketch_canvas_through_the_tab(tmp_path):
    blocks, named = g4.build_tab(tmp_path)
    brush = named["anydressing_segment_brush"]
    assert isinstance(brush, gr.Image) and (brush.tool, brush.source, brush.type) == ("sketch", "upload", "numpy")
    layer, painted = g4.stroke_layer(g4.PHOTO)
    sent = {"image": _data_url(g4.photo()), "mask": _data_url(layer)}  # what the sketch tool posts
    value = brush.preprocess(sent)
    assert value["mask"].shape == (*g4.PHOTO[::-1], 3)
    assert np.array_equal(strokes_mask(value), painted)
    st = _state()
    add = g4.handler(blocks, named["Add strokes to the mask"])
    assert add(st, value, *EDITS)[0] is st and np.array_equal(st.mask(MaskEdits()), painted)
    blank = brush.preprocess({"image": _data_url(g4.photo()), "mask": _data_url(np.zeros_like(layer))})
    assert "no brush strokes" in add(st, blank, *EDITS)[-1]
    shown = g4.handler(blocks, named[segment_tab.LOAD_PREVIEW])(st, *EDITS)
    assert isinstance(shown, Image.Image) and brush.postprocess(shown).startswith("data:image/png;base64,")


@pytest.mark.skipif(not GRADIO_4, reason="gradio 4 (Forge's) is not importable here; ANYDRESSING_GRADIO4_PYTHON "
                    "runs these checks in a gradio-4 venv (test_gradio_4_checks_in_a_gradio_4_venv)")  # fmt: skip
def test_gradio_4_editor_through_the_tab(tmp_path):
    g4.check_gradio_4(tmp_path)


def test_gradio_4_checks_in_a_gradio_4_venv():
    python = os.environ.get("ANYDRESSING_GRADIO4_PYTHON", "")
    if not python or not Path(python).is_file():
        pytest.skip("set ANYDRESSING_GRADIO4_PYTHON to the python of a venv with gradio 4.40 (Forge's) and torch")
    run = subprocess.run(
        [python, str(Path(g4.__file__)), "check"], cwd=g4.ROOT, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("ok:") == 4 and "ok: gradio 4." in run.stdout, run.stdout


def _data_url(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
