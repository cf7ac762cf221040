"""A clothes parser: transformers' SegformerForSemanticSegmentation read from a local folder, one body part
per pixel.

Public clothes/human parsers (segformer_b2_clothes and its kind) are this class with ATR- or LIP-style
labels. The labels come from the folder's config.json and are mapped onto `PARTS` by name, so a parser
with other label names or another order works as long as its names say what they are. Nothing is
downloaded; the weights go through files/pretrained.py (safetensors, or a .bin with `weights_only`).
One parse per image content is kept (`cache_size`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..files.pretrained import WEIGHT_FILES, load_pretrained
from ..files.weights import WeightsFileError

PARTS = (
    "background", "hair", "face", "neck", "upper", "lower", "dress", "belt", "shoes", "hat", "bag", "scarf",
    "arms", "legs", "other",
)  # fmt: skip
PART_INDEX = {name: i for i, name in enumerate(PARTS)}
_WORDS = (  # the first rule whose word is in a label names its part; labels split into lower-case words
    ("background", "background"), ("hair", "hair"), ("face", "face"), ("sunglasses", "face"),
    ("glasses", "face"), ("neck", "neck"), ("upper", "upper"), ("coat", "upper"), ("jacket", "upper"),
    ("shirt", "upper"), ("top", "upper"), ("sweater", "upper"), ("jumpsuit", "dress"), ("dress", "dress"),
    ("skirt", "lower"), ("pants", "lower"), ("trousers", "lower"), ("shorts", "lower"), ("jeans", "lower"),
    ("belt", "belt"), ("shoe", "shoes"), ("boot", "shoes"), ("sock", "shoes"), ("hat", "hat"), ("cap", "hat"),
    ("bag", "bag"), ("scarf", "scarf"), ("arm", "arms"), ("hand", "arms"), ("glove", "arms"), ("leg", "legs"),
    ("foot", "legs"),
)  # fmt: skip
MAX_SIDE = 2048  # the largest label map computed from logits; larger photos get it scaled up (labels_of)
EXTENSION_PARSER_DIR = Path(__file__).resolve().parents[2] / "models" / "parser"


class ParserError(WeightsFileError):
    """A parser folder that cannot be used, with a message meant for the user."""


def part_of(label: str) -> str:
    """The body part a parser label names ('Upper-clothes' -> upper, 'Left-leg' -> legs); 'other' if none."""
    words = re.sub(r"[-_]+", " ", re.sub(r"(?<=[a-z])(?=[A-Z])", " ", label)).lower()  # LIP: 'UpperClothes'
    for word, part in _WORDS:
        if re.search(rf"\b{word}s?\b", words):
            return part
    return "other"


def find_parsers(dirs: Iterable[Path], hf_cache: bool = True) -> dict[str, Path]:
    """Parser folders by name: each folder in `dirs` holding a segformer config.json (or such a folder
    itself), then the HF cache's snapshots (named as the repo, e.g. 'mattmdjaga/segformer_b2_clothes')."""
    found: dict[str, Path] = {}
    for folder in dirs:
        for candidate in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())] if folder.is_dir() else []:
            if _is_segformer(candidate):
                found.setdefault(candidate.name, candidate)
    for name, snapshot in _hf_snapshots() if hf_cache else []:
        found.setdefault(name, snapshot)
    return found


def _hf_snapshots() -> list[tuple[str, Path]]:
    home = os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(home) / "hub")
    snapshots = []
    for repo in sorted(hub.glob("models--*")) if hub.is_dir() else []:
        for snapshot in sorted((repo / "snapshots").glob("*")):
            if _is_segformer(snapshot):
                snapshots.append((repo.name.removeprefix("models--").replace("--", "/"), snapshot))
    return snapshots


def _is_segformer(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return config.get("model_type") == "segformer" and any((folder / f).is_file() for f in WEIGHT_FILES)


class GarmentParser:
    """One parser folder loaded on `device`; `parts(image)` is the (H, W) map of PARTS indices."""

    def __init__(self, folder: str | Path, device: torch.device | str = "cpu", cache_size: int = 4) -> None:
        from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

        self.folder = Path(folder)
        config = self._config(SegformerConfig)
        model = load_pretrained(self.folder, SegformerForSemanticSegmentation, error=ParserError)
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        has_processor = (self.folder / "preprocessor_config.json").is_file()
        self.processor = (
            SegformerImageProcessor.from_pretrained(str(self.folder), local_files_only=True) if has_processor else None
        )
        self.processor = self.processor or SegformerImageProcessor()  # segformer's own: 512x512, ImageNet stats
        labels = {int(i): name for i, name in config.id2label.items()}
        self.labels = labels
        self.label_parts = np.array([PART_INDEX[part_of(labels.get(i, ""))] for i in range(config.num_labels)])
        self.cache_size = cache_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def _config(self, config_class: type):
        """The folder's config, refused (naming why) unless it is a segformer whose labels name garments."""
        path = self.folder / "config.json"
        if not path.is_file():
            raise ParserError(f"'{self.folder}' is not a parser folder: it has no config.json")
        try:
            kind = json.loads(path.read_text(encoding="utf-8")).get("model_type")
            config = config_class.from_pretrained(str(self.folder), local_files_only=True)
        except (OSError, ValueError, AttributeError) as e:
            raise ParserError(f"'{path}' cannot be read: {e}") from e
        if kind != "segformer":
            raise ParserError(f"'{self.folder.name}' is not a segformer clothes parser (its config says '{kind}')")
        names = {part_of(name) for name in config.id2label.values()}
        if not names & {"upper", "lower", "dress"}:
            raise ParserError(
                f"'{self.folder.name}' labels no garments (its labels: {list(config.id2label.values())[:8]}...): "
                "a clothes parser labels upper clothes, pants, skirts or dresses"
            )
        return config

    def parts(self, image: Image.Image) -> np.ndarray:
        """(H, W) uint8 PARTS indices at `image`'s size; the same image content is parsed once."""
        rgb = image.convert("RGB")
        key = hashlib.sha256(rgb.tobytes() + repr(rgb.size).encode()).hexdigest()
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        labels = self.labels_of(rgb)
        parts = self.label_parts[labels].astype(np.uint8)
        self._cache[key] = parts
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return parts

    @torch.no_grad()
    def labels_of(self, rgb: Image.Image) -> np.ndarray:
        """(H, W) label ids: the logits (at a quarter of the processor's size) upsampled to the image, argmax.

        Upsampled to at most `MAX_SIDE` on the long side, the label map then scaled to the image by nearest
        neighbour: the logits of a 6000x8000 photo at full size would take gigabytes for no finer edges.
        """
        pixels = self.processor(images=rgb, return_tensors="pt")["pixel_values"]
        param = next(self.model.parameters())
        logits = self.model(pixel_values=pixels.to(self.device, param.dtype)).logits
        scale = min(1.0, MAX_SIDE / max(rgb.size))
        size = (max(1, round(rgb.height * scale)), max(1, round(rgb.width * scale)))
        logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
        labels = logits[0].argmax(0).to(torch.uint8 if logits.shape[1] <= 256 else torch.int32).cpu().numpy()
        if size != (rgb.height, rgb.width):
            labels = np.asarray(Image.fromarray(labels).resize(rgb.size, Image.Resampling.NEAREST))
        return labels


INSTALL_HINT = (
    "put a segformer clothes parser (e.g. the files of mattmdjaga/segformer_b2_clothes: config.json, "
    "model.safetensors, preprocessor_config.json) in a folder under models/parser"
)


class ParserStore:
    """The one parser a process keeps: the dressing script and the Segment tab share it."""

    def __init__(self) -> None:
        self._loaded: tuple[tuple, GarmentParser] | None = None

    def get(self, dirs: Iterable[Path], name: str = "", device: torch.device | str = "cpu") -> GarmentParser:
        """The parser called `name` in `dirs` or the HF cache (the first found when empty), loaded once."""
        found = find_parsers(dirs)
        if not found:
            raise ParserError(f"no clothes parser is installed: {INSTALL_HINT}")
        if name and name not in found:
            raise ParserError(f"the clothes parser '{name}' is not installed; installed: {', '.join(found)}")
        folder = found[name] if name else next(iter(found.values()))
        key = (str(folder), str(device), *(p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()))
        if self._loaded is None or self._loaded[0] != key:
            self._loaded = None  # the old one goes before the new one is built
            self._loaded = (key, GarmentParser(folder, device))
        return self._loaded[1]


PARSERS = ParserStore()
