"""Garment-Specific Feature Extractor: one LoRA per garment slot on GarmentsNet's self-attention q/k/v.

All garments run in one batched forward; row i of the batch uses slot `slots[i]`'s LoRA, so adding a
slot costs only LoRA parameters (docs/method.md GFE).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .unet_layers import module_key

PROJECTIONS = ("q", "k", "v")


class SlotLoRA(nn.Module):
    """Per-slot low-rank deltas for one linear layer: delta_s(x) = (alpha / rank) * up_s(down_s(x))."""

    def __init__(self, n_slots: int, in_features: int, out_features: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.rank = rank
        self.alpha = alpha
        self.down = nn.Parameter(torch.empty(n_slots, rank, in_features))
        self.up = nn.Parameter(torch.zeros(n_slots, out_features, rank))  # zero: a new slot starts as the base
        nn.init.normal_(self.down, std=1.0 / rank)

    def delta(self, x: Tensor, slots: Tensor) -> Tensor:
        """x: (B, T, in); slots: (B,) slot index of each row. Returns (B, T, out)."""
        down = self.down.index_select(0, slots).to(x.dtype)
        up = self.up.index_select(0, slots).to(x.dtype)
        return torch.bmm(torch.bmm(x, down.transpose(1, 2)), up.transpose(1, 2)) * (self.alpha / self.rank)


class GarmentLoRA(nn.Module):
    """The GFE LoRAs of every GarmentsNet self-attention layer, keyed by layer name."""

    def __init__(self, layer_dims: dict[str, tuple[int, int]], n_slots: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.n_slots = n_slots
        self.rank = rank
        self.alpha = alpha
        self.layer_names = list(layer_dims)
        self.layers = nn.ModuleDict(
            {
                module_key(name): nn.ModuleDict({p: SlotLoRA(n_slots, dim, inner, rank, alpha) for p in PROJECTIONS})
                for name, (dim, inner) in layer_dims.items()
            }
        )

    def for_layer(self, name: str) -> nn.ModuleDict:
        return self.layers[module_key(name)]
