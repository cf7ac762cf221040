"""The Segment tab under gradio 4 (Forge's 4.40), for a gradio-4 interpreter; plain Python, no pytest.

    python tests/gradio4_env.py                   build the tab, feed the Brush what gradio 4 hands a handler
    python tests/gradio4_env.py serve PORT DIR    serve the AnyDressing tab on 127.0.0.1:PORT (browser test)

tests/test_segment_brush.py runs the checks in-process where gradio 4 is the installed gradio, and this
file in the interpreter named by ANYDRESSING_GRADIO4_PYTHON otherwise; it also uses `build_tab`, `handler`,
`photo` and `stroke_layer` with gradio 3. The gradio-4 venv needs gradio 4.40 and what lib_anydressing's
segment code imports: torch, numpy<2, opencv-python-headless, safetensors, segment-anything.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import gradio as gr  # noqa: E402

from lib_anydressing.segment.session import MaskEdits, SegmentState  # noqa: E402
from lib_anydressing.tabs import segment_tab  # noqa: E402

PHOTO = (40, 30)  # w, h
PINK = (255, 0, 200)  # the brush's one colour


def build_tab(out: Path) -> tuple[gr.Blocks, dict[str, gr.components.Component]]:
    """The Segment tab in a Blocks, with one send target; its components by elem_id and by label."""
    with gr.Blocks() as blocks:
        slot = gr.Image(label="Garment 1", type="pil")
        segment_tab.build(lambda: [], out, [segment_tab.SendTarget("txt2img garment 1", [slot], "switch_to_txt2img()")])
    named = {}
    for block in blocks.blocks.values():
        for key in (getattr(block, "elem_id", None), getattr(block, "label", None), getattr(block, "value", None)):
            if isinstance(key, str):
                named.setdefault(key, block)
    return blocks, named


def handler(blocks: gr.Blocks, trigger: gr.blocks.Block) -> Callable:
    """The function that `trigger`'s event runs, as the Blocks registered it (gradio 3: a list of
    functions and dependencies whose targets are ids; gradio 4: a dict of functions with (id, event))."""
    if isinstance(blocks.fns, dict):
        found = [f.fn for f in blocks.fns.values() if any(t[0] == trigger._id for t in f.targets)]
    else:
        found = [f.fn for f, d in zip(blocks.fns, blocks.dependencies, strict=True) if trigger._id in d["targets"]]
    assert len(found) == 1, f"{len(found)} functions run on {trigger}"
    return found[0]


def photo() -> np.ndarray:
    """A grey photo (PHOTO) with a red square in the middle."""
    image = np.full((PHOTO[1], PHOTO[0], 3), 128, np.uint8)
    image[10:20, 15:25] = (210, 30, 40)
    return image


def stroke_layer(size: tuple[int, int], antialiased: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """An RGBA canvas layer as a browser draws it: transparent, one pink horizontal stroke whose edge rows
    are half transparent; and the pixels it covers."""
    w, h = size
    layer = np.zeros((h, w, 4), np.uint8)
    y = h // 2
    layer[y - 1 : y + 2, 2 : w - 2] = (*PINK, 255)
    if antialiased:
        layer[[y - 2, y + 2], 2 : w - 2] = (*PINK, 90)
    return layer, layer[..., 3] > 0


def canvas_pngs(folder: Path, background: np.ndarray, layer: np.ndarray) -> dict[str, Path]:
    """The PNG files gradio 4.40's ImageEditor uploads (InteractiveImageEditor.svelte `get_data`: the
    canvas's blobs as background.png, layer_0.png, composite.png, each the canvas's size, RGBA)."""
    folder.mkdir(parents=True, exist_ok=True)
    rgba = np.dstack([background, np.full(background.shape[:2], 255, np.uint8)])
    composite = Image.alpha_composite(Image.fromarray(rgba), Image.fromarray(layer))
    files = {"background": folder / "background.png", "layer": folder / "layer_0.png"}
    files["composite"] = folder / "composite.png"
    Image.fromarray(rgba).save(files["background"])
    Image.fromarray(layer).save(files["layer"])
    composite.save(files["composite"])
    return files


def editor_payload(files: dict[str, Path], layers: bool = True):
    """What gradio 4.40's frontend sends for the ImageEditor: EditorData of FileData (the uploaded files)."""
    from gradio.components.image_editor import EditorData
    from gradio.data_classes import FileData

    def data(path: Path) -> FileData:
        return FileData(path=str(path), orig_name=path.name)

    return EditorData(
        background=data(files["background"]),
        layers=[data(files["layer"])] if layers else [],
        composite=data(files["composite"]),
    )


def check_gradio_4(tmp: Path) -> list[str]:
    """Everything that must hold on gradio 4; returns what was checked, one line each."""
    major = int(gr.__version__.split(".")[0])
    assert major >= 4, f"gradio {gr.__version__} is not gradio 4"
    assert segment_tab.GRADIO_4
    done = []
    blocks, named = build_tab(tmp / "out")
    brush = named["anydressing_segment_brush"]
    assert isinstance(brush, gr.ImageEditor), type(brush)
    assert (brush.type, brush.image_mode, list(brush.transforms), brush.layers) == ("numpy", "RGBA", [], False)
    assert list(brush.sources) == [], "no upload source: the editor opens on the brush"
    assert len(brush.brush.colors) == 1 and brush.brush.color_mode == "fixed"
    done.append(f"gradio {gr.__version__}: the tab builds; the Brush is an ImageEditor (numpy, RGBA, no crop)")

    layer, painted = stroke_layer(PHOTO)
    files = canvas_pngs(tmp / "canvas", photo(), layer)
    value = brush.preprocess(editor_payload(files))
    assert sorted(value) == ["background", "composite", "layers"] and len(value["layers"]) == 1
    assert value["layers"][0].shape == (PHOTO[1], PHOTO[0], 4) and value["layers"][0].dtype == np.uint8
    assert np.array_equal(segment_tab.strokes_mask(value), painted)
    done.append("ImageEditor.preprocess of the frontend's files: strokes_mask is the layer's alpha > 0")

    st = SegmentState()
    st.set_image(photo())
    edits = [0, 0, False, False, False, "best", 512]
    add = handler(blocks, named["Add strokes to the mask"])
    outputs = add(st, value, *edits)
    assert outputs[0] is st and np.array_equal(st.mask(MaskEdits()), painted), "the strokes are the mask"
    assert "⚠" not in outputs[-1]
    subtract = handler(blocks, named["Subtract strokes from the mask"])
    subtract(st, value, *edits)
    assert not st.mask(MaskEdits()).any()
    blank = brush.preprocess(editor_payload(canvas_pngs(tmp / "blank", photo(), np.zeros_like(layer))))
    status = add(st, blank, *edits)[-1]
    assert "no brush strokes" in status, status
    status = add(st, brush.preprocess(editor_payload(files, layers=False)), *edits)[-1]
    assert "no brush strokes" in status, status
    other, _ = stroke_layer((30, 30))
    status = add(st, brush.preprocess(editor_payload(canvas_pngs(tmp / "square", photo()[:, :30], other))), *edits)[-1]
    assert "the brush canvas is 30x30, the photo 40x30" in status, status
    done.append("the Add/Subtract handlers paint the strokes, and say why not (no strokes, another shape)")

    load = handler(blocks, named[segment_tab.LOAD_PREVIEW])
    shown = load(st, *edits)
    sent = brush.postprocess(shown)
    assert sent.background is not None and sent.layers == [] and sent.composite is None
    assert Image.open(sent.background.path).size == PHOTO
    assert brush.postprocess(segment_tab.brush_value(None)) is None
    done.append("'Load the preview' gives the ImageEditor a value it takes: the preview as background")
    return done


def serve(port: int, out: Path) -> None:
    """The standalone app (`python -m lib_anydressing ui`: the tabs and javascript/) on 127.0.0.1."""
    from lib_anydressing.tabs.app import standalone_app

    standalone_app(lambda: [], out).queue().launch(server_name="127.0.0.1", server_port=port)


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        serve(int(argv[1]), Path(argv[2]))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for line in check_gradio_4(Path(tmp)):
            print("ok:", line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
