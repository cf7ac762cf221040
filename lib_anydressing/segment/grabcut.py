"""Segmentation with no model at all: OpenCV's GrabCut, seeded from the same clicks and box as SAM."""

from __future__ import annotations

import cv2
import numpy as np

WORK_SIZE = 1024


def grabcut(
    image: np.ndarray,
    points: list[tuple[float, float]] | None = None,
    labels: list[int] | None = None,
    box: tuple[float, float, float, float] | None = None,
    iterations: int = 5,
) -> np.ndarray:
    """(H, W) bool mask. With a box, outside it is background; positive/negative clicks are sure
    foreground/background discs. With clicks only, the box is the clicks' bounding box, grown.
    Large images are segmented at WORK_SIZE on the long side and the mask scaled back."""
    h, w = image.shape[:2]
    scale = WORK_SIZE / max(h, w)
    if scale < 1:
        small = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        scaled_points = [(x * scale, y * scale) for x, y in (points or [])]
        scaled_box = None if box is None else tuple(v * scale for v in box)
        mask = grabcut(small, scaled_points, labels, scaled_box, iterations)
        return cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
    points = points or []
    labels = labels or [1] * len(points)
    if box is None:
        positives = [p for p, lab in zip(points, labels, strict=True) if lab == 1]
        if not positives:
            return np.zeros((h, w), dtype=bool)
        xs, ys = [p[0] for p in positives], [p[1] for p in positives]
        margin = 0.35 * max(w, h)
        box = (min(xs) - margin, min(ys) - margin, max(xs) + margin, max(ys) + margin)
    x0, y0 = int(np.clip(box[0], 0, w - 1)), int(np.clip(box[1], 0, h - 1))
    x1, y1 = int(np.clip(box[2], x0 + 1, w)), int(np.clip(box[3], y0 + 1, h))
    mask = np.full((h, w), cv2.GC_BGD, dtype=np.uint8)
    mask[y0:y1, x0:x1] = cv2.GC_PR_FGD
    radius = max(2, min(h, w) // 50)
    for (x, y), lab in zip(points, labels, strict=True):
        cv2.circle(mask, (int(x), int(y)), radius, int(cv2.GC_FGD if lab == 1 else cv2.GC_BGD), -1)
    if not (mask == cv2.GC_BGD).any() or not ((mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)).any():
        return mask != cv2.GC_BGD
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.grabCut(np.ascontiguousarray(image[..., ::-1]), mask, None, bgd, fgd, iterations, cv2.GC_INIT_WITH_MASK)
    return (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
