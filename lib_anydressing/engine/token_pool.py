"""Pooled garment tokens for the finest UNet layers, where attention over garments costs the most.

Each s x s window of a garment's token grid becomes one token, the window's mean, standing for the
window's tokens: its logit gets + log(count). That is exact when a window's tokens are equal (s equal
keys in one softmax weigh as one key with log(s) added) and the mean otherwise. Keys and values are
linear in the features, so pooling the features before projecting equals pooling K and V.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

POOL_CHOICES = (1, 2, 4)  # 1: every token; s: s x s windows at the finest layers


def pool_tokens(features: Tensor, grid_hw: tuple[int, int], size: int) -> tuple[Tensor, Tensor]:
    """(N, h*w, C) tokens on an (h, w) grid -> ((N, T', C) window means, (T',) tokens per window).

    Edge windows of a grid not divisible by `size` average the tokens they hold.
    """
    n, t, c = features.shape
    h, w = grid_hw
    if h * w != t:
        raise ValueError(f"{t} tokens are not a {h}x{w} grid")
    grid = features.transpose(1, 2).reshape(n, c, h, w)
    pooled = F.avg_pool2d(grid, size, ceil_mode=True)
    counts = F.avg_pool2d(grid.new_ones(1, 1, h, w), size, ceil_mode=True, divisor_override=1)
    return pooled.flatten(2).transpose(1, 2), counts.flatten()
