"""Mask edits on (H, W) masks: bool in, bool out, except `feather`, which makes a soft alpha."""

from __future__ import annotations

import cv2
import numpy as np


def _kernel(pixels: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pixels + 1, 2 * pixels + 1))


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    return cv2.dilate(mask.astype(np.uint8), _kernel(pixels)).astype(bool) if pixels > 0 else mask.copy()


def erode(mask: np.ndarray, pixels: int) -> np.ndarray:
    return cv2.erode(mask.astype(np.uint8), _kernel(pixels)).astype(bool) if pixels > 0 else mask.copy()


def grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Dilate for positive `pixels`, erode for negative: the one slider the UI shows."""
    return dilate(mask, pixels) if pixels >= 0 else erode(mask, -pixels)


def feather(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Soft edge: float alpha in [0, 1], blurred over about `pixels` on each side of the edge."""
    alpha = mask.astype(np.float32)
    if pixels <= 0:
        return alpha
    return np.clip(cv2.GaussianBlur(alpha, (0, 0), sigmaX=pixels / 2.0), 0.0, 1.0)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Background not connected to the border becomes foreground."""
    h, w = mask.shape
    padded = np.zeros((h + 2, w + 2), np.uint8)
    padded[1:-1, 1:-1] = mask.astype(np.uint8)
    flood = padded.copy()
    cv2.floodFill(flood, np.zeros((h + 4, w + 4), np.uint8), (0, 0), 1)
    return (padded[1:-1, 1:-1] | (flood[1:-1, 1:-1] == 0)).astype(bool)


def largest_component(mask: np.ndarray) -> np.ndarray:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 1:
        return np.zeros_like(mask, dtype=bool)
    return labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


def invert(mask: np.ndarray) -> np.ndarray:
    return ~mask.astype(bool)


def paint(mask: np.ndarray, strokes: np.ndarray, add: bool) -> np.ndarray:
    """Brush strokes (H, W bool) added to or subtracted from the mask."""
    return mask | strokes if add else mask & ~strokes
