"""Dressing-Attention's trainable projections W'_k, W'_v, one pair per DressingNet self-attention layer."""

from __future__ import annotations

import torch
from torch import nn

from .unet_layers import module_key, self_attention_layers


class DressingProjections(nn.Module):
    """K' = F_all W'_k, V' = F_all W'_v (docs/method.md DA), keyed by layer name."""

    def __init__(self, layer_dims: dict[str, tuple[int, int]]) -> None:
        super().__init__()
        self.layer_names = list(layer_dims)
        self.to_k = nn.ModuleDict({module_key(n): nn.Linear(d, i, bias=False) for n, (d, i) in layer_dims.items()})
        self.to_v = nn.ModuleDict({module_key(n): nn.Linear(d, i, bias=False) for n, (d, i) in layer_dims.items()})

    @classmethod
    def from_unet(cls, unet: nn.Module) -> DressingProjections:
        """Initialised from each layer's own W_k, W_v, as the paper does when there is no checkpoint."""
        layers = self_attention_layers(unet)
        proj = cls({layer.name: (layer.dim, layer.inner_dim) for layer in layers})
        with torch.no_grad():
            for layer in layers:
                k, v = proj.pair(layer.name)
                k.weight.copy_(layer.attn.to_k.weight)
                v.weight.copy_(layer.attn.to_v.weight)
        return proj

    def pair(self, layer: str) -> tuple[nn.Linear, nn.Linear]:
        return self.to_k[module_key(layer)], self.to_v[module_key(layer)]
