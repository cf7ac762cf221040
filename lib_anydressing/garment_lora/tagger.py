"""Tags from a WD14 tagger the user already has: `model.onnx` + `selected_tags.csv` in one folder.

Nothing is downloaded and onnxruntime is never installed by the extension: without the files or the
package the captions stay the template (trigger word + class word), and the reason is shown.
The model takes (N, S, S, 3) float32 BGR in 0..255, the picture padded to a white square; it returns
one probability per row of selected_tags.csv, whose `category` column is 0 for general tags,
4 for characters, 9 for ratings.
"""

from __future__ import annotations

import csv
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

MODEL, TAGS = "model.onnx", "selected_tags.csv"
GENERAL = 0
DEFAULT_SIZE = 448  # WD14 v2/v3 models; read from the model's input when it is static
WORDS = re.compile(r"[A-Za-z]{2}")  # "long_sleeves" is words; "^_^" and "o_o" are kaomoji, kept as they are


class TaggerError(RuntimeError):
    """Why the tagger cannot run, for the user."""


@dataclass
class Label:
    name: str
    category: int


def read_labels(path: Path) -> list[Label]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or "name" not in rows[0] or "category" not in rows[0]:
        raise TaggerError(f"{path.name} has no 'name' and 'category' columns: not a WD14 tag list")
    return [Label(r["name"], int(r["category"])) for r in rows]


def readable(tag: str) -> str:
    return tag.replace("_", " ") if WORDS.search(tag) else tag


def postprocess(
    probs: np.ndarray, labels: list[Label], threshold: float = 0.35, exclude: frozenset[str] = frozenset()
) -> list[str]:
    """General tags with probability >= threshold, most likely first, underscores as spaces."""
    if probs.shape[-1] != len(labels):
        raise TaggerError(f"the model gives {probs.shape[-1]} scores but {TAGS} lists {len(labels)} tags")
    picked = [(float(p), lab) for p, lab in zip(probs, labels, strict=True) if lab.category == GENERAL]
    tags = [readable(lab.name) for p, lab in sorted(picked, key=lambda x: -x[0]) if p >= threshold]
    return [t for t in tags if t not in exclude]


def preprocess(image: Image.Image, size: int) -> np.ndarray:
    """(1, size, size, 3) float32 BGR 0..255: on white, padded to a square, resized."""
    rgba = image.convert("RGBA")
    on_white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    on_white.alpha_composite(rgba)
    side = max(rgba.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(on_white.convert("RGB"), ((side - rgba.width) // 2, (side - rgba.height) // 2))
    square = square.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(square, dtype=np.float32)[None, :, :, ::-1].copy()


def missing_files(folder: Path) -> list[str]:
    return [name for name in (MODEL, TAGS) if not (folder / name).is_file()]


class WD14Tagger:
    """Labels read at once (cheap, checks the folder); the ONNX session made on first use."""

    def __init__(self, folder: Path, threshold: float = 0.35) -> None:
        missing = missing_files(folder)
        if missing:
            raise TaggerError(f"'{folder}' has no {' or '.join(missing)}: put a WD14 tagger's {MODEL} and {TAGS} there")
        self.folder, self.threshold = folder, threshold
        self.labels = read_labels(folder / TAGS)
        self._session = None

    def session(self):
        if self._session is None:
            if importlib.util.find_spec("onnxruntime") is None:
                raise TaggerError("onnxruntime is not installed (pip install onnxruntime in the WebUI's Python)")
            import onnxruntime as ort

            wanted = ("CUDAExecutionProvider", "CPUExecutionProvider")
            providers = [p for p in wanted if p in ort.get_available_providers()]
            try:
                self._session = ort.InferenceSession(str(self.folder / MODEL), providers=providers)
            except Exception as e:  # onnxruntime's own error classes: a corrupt or foreign file
                raise TaggerError(f"onnxruntime cannot open {MODEL}: {e}") from e
        return self._session

    def tags(self, image: Image.Image, exclude: frozenset[str] = frozenset()) -> list[str]:
        session = self.session()
        first = session.get_inputs()[0]
        size = first.shape[1] if isinstance(first.shape[1], int) else DEFAULT_SIZE
        try:
            probs = session.run(None, {first.name: preprocess(image, size)})[0][0]
        except Exception as e:  # onnxruntime's own error classes: a model that is not a WD14 tagger
            raise TaggerError(f"the tagger failed on this image: {e}") from e
        return postprocess(np.asarray(probs), self.labels, self.threshold, exclude)
