"""Per-garment region masks turned into attention biases at each layer's token grid.

Query positions outside garment k's region get -inf on garment k's tokens: Instance-Level Garment
Localization applied at inference time instead of only as a training loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def region_tokens(region: Tensor, grid_hw: tuple[int, int]) -> Tensor:
    """A (H, W) mask of any resolution -> (h * w,) bool at the layer's grid (area average > 0.5)."""
    m = region.detach().float()[None, None]
    m = F.interpolate(m, size=grid_hw, mode="area") if m.shape[-2:] != grid_hw else m
    return (m[0, 0] > 0.5).flatten()


def garment_bias(
    regions: Sequence[Tensor | None],
    grid_hw: tuple[int, int],
    garment_tokens: int,
    logit_offsets: Sequence[float] | None = None,
    *,
    with_own_tokens: bool = False,
) -> tuple[Tensor, Tensor]:
    """Additive bias (T, N * garment_tokens) and a (T, 1) row-validity mask.

    A query outside every given region must not attend to any garment. When the softmax also holds
    the query's own tokens (joint attention) plain -inf does that. Otherwise an all -inf row would be
    NaN, so such a row gets no bias and validity 0, and the caller zeroes its output.
    """
    t = grid_hw[0] * grid_hw[1]
    n = len(regions)
    allowed = torch.ones(t, n, dtype=torch.bool)
    for k, region in enumerate(regions):
        if region is not None:
            allowed[:, k] = region_tokens(region, grid_hw)
    any_region = any(r is not None for r in regions)
    valid = allowed.any(dim=1, keepdim=True) if any_region else torch.ones(t, 1, dtype=torch.bool)
    if not with_own_tokens:
        allowed = allowed | ~valid
    bias = torch.zeros(t, n)
    if logit_offsets is not None:
        bias += torch.tensor(logit_offsets, dtype=bias.dtype)
    bias = bias.masked_fill(~allowed, float("-inf"))
    return bias.repeat_interleave(garment_tokens, dim=1), valid
