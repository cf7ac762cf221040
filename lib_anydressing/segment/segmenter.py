"""One place that turns prompts into a mask: SAM when a checkpoint is chosen, GrabCut otherwise."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..files.images import to_rgb_and_mask
from .grabcut import grabcut
from .predictor import CachedPredictor, Prediction
from .sam_models import build_sam, find_sam_files, read_state_dict

GRABCUT = "GrabCut (no SAM model)"
SAM_HINT = "put a Segment Anything checkpoint (.pth) in models/sam for better masks"


def engine_choices(sam_dirs: Iterable[Path]) -> list[str]:
    """GrabCut, then the SAM files found: the UIs default to the last, so a SAM model when there is one."""
    return [GRABCUT, *find_sam_files(sam_dirs)]


@dataclass
class Result:
    mask: np.ndarray  # (H, W) bool
    engine: str  # which engine made it, shown in the UI
    candidates: Prediction | None = None  # SAM's three masks and scores


def as_rgb_array(image: Image.Image) -> np.ndarray:
    """Any PIL image (any mode, 16-bit, alpha...) as (H, W, 3) uint8 RGB."""
    rgb, _ = to_rgb_and_mask(image)
    return np.asarray(rgb, dtype=np.uint8)


class Segmenter:
    """Holds at most one SAM model (freed on request) and its embedding cache."""

    def __init__(self) -> None:
        self.predictor: CachedPredictor | None = None
        self.model_path: Path | None = None
        self.variant = ""

    def load(self, path: Path | None, device: str = "cpu") -> str:
        """Switch model (None: GrabCut). Returns what is now in use."""
        if path is None:
            self.free()
            return GRABCUT
        if self.model_path != path or self.predictor is None or str(self.predictor.predictor.device) != device:
            self.free()
            model, variant = build_sam(read_state_dict(path))
            model_id = f"{path.name}:{hashlib.sha1(str(path.stat().st_mtime_ns).encode()).hexdigest()[:8]}"
            self.predictor = CachedPredictor(model.to(device), model_id)
            self.model_path, self.variant = path, variant
        return self.engine

    def free(self) -> None:
        self.predictor, self.model_path, self.variant = None, None, ""

    @property
    def engine(self) -> str:
        return GRABCUT if self.predictor is None else f"SAM {self.variant} ({self.model_path.name})"

    def segment(
        self,
        image: np.ndarray,
        points: list[tuple[float, float]] | None = None,
        labels: list[int] | None = None,
        box: tuple[float, float, float, float] | None = None,
        previous_logits: np.ndarray | None = None,
    ) -> Result:
        if not points and box is None:
            return Result(np.zeros(image.shape[:2], dtype=bool), self.engine)
        if self.predictor is None:
            return Result(grabcut(image, points, labels, box), self.engine)
        self.predictor.set_image(image)
        prediction = self.predictor.predict(points, labels, box, previous_logits)
        return Result(prediction.mask, self.engine, prediction)
