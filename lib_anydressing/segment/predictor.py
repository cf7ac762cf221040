"""Click-to-segment with the image embedding computed once per image and model.

SAM's image encoder is the expensive part (seconds on a CPU); the prompt decoder is cheap. The
embedding of each image is kept (a few, least recently used first out), so every further click,
box or refinement on that image costs only the decoder.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class Prediction:
    masks: np.ndarray  # (3, H, W) bool: SAM's candidate masks
    scores: np.ndarray  # (3,) predicted IoU
    low_res_logits: np.ndarray  # (3, 256, 256): feed the chosen one back to refine
    best: int  # index of the highest score

    @property
    def mask(self) -> np.ndarray:
        return self.masks[self.best]


class CachedPredictor:
    """segment-anything's SamPredictor with an embedding cache keyed by image content."""

    def __init__(self, model: nn.Module, model_id: str, max_images: int = 4) -> None:
        from segment_anything import SamPredictor

        self.predictor = SamPredictor(model)
        self.model_id = model_id
        self.max_images = max_images
        self._cache: OrderedDict[str, tuple[torch.Tensor, tuple, tuple]] = OrderedDict()
        self.encoder_runs = 0
        self._last: tuple[np.ndarray, str] | None = None  # the last array seen and its hash

    def set_image(self, image: np.ndarray) -> bool:
        """Make `image` (H, W, 3 uint8 RGB) current; True if its embedding came from the cache.

        The content hash that keys the cache is taken once per array: further clicks on the same
        array (which nothing modifies in place) skip hashing a possibly many-megapixel photo.
        """
        if self._last is not None and self._last[0] is image:
            key = self._last[1]
        else:
            key = hashlib.sha1(image.tobytes() + repr(image.shape).encode() + self.model_id.encode()).hexdigest()
            self._last = (image, key)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            p = self.predictor
            p.features, p.original_size, p.input_size = cached
            p.is_image_set = True
            return True
        self.predictor.set_image(image)
        self.encoder_runs += 1
        p = self.predictor
        self._cache[key] = (p.features, p.original_size, p.input_size)
        while len(self._cache) > self.max_images:
            self._cache.popitem(last=False)
        return False

    def predict(
        self,
        points: list[tuple[float, float]] | None = None,
        labels: list[int] | None = None,
        box: tuple[float, float, float, float] | None = None,
        previous_logits: np.ndarray | None = None,
    ) -> Prediction:
        """Three candidates for the prompts; `previous_logits` (256x256) refines an earlier mask."""
        coords = np.asarray(points, dtype=np.float32) if points else None
        point_labels = np.asarray(labels, dtype=np.int64) if points else None
        masks, scores, logits = self.predictor.predict(
            point_coords=coords,
            point_labels=point_labels,
            box=None if box is None else np.asarray(box, dtype=np.float32),
            mask_input=None if previous_logits is None else previous_logits[None],
            multimask_output=True,
        )
        return Prediction(masks, scores, logits, int(np.argmax(scores)))
