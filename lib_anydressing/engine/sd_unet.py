"""Builds ldm UNets of the SD1.5 topology (the real class the WebUI runs) for the bench, demo and tests.

Weights are re-initialised: a fresh ldm UNet zero-initialises its output convolutions and would
output exactly zero, which would hide every difference a test or benchmark looks for.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

SD15_UNET: dict[str, Any] = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "attention_resolutions": [4, 2, 1],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 4, 4],
    "num_heads": 8,
    "use_spatial_transformer": True,
    "transformer_depth": 1,
    "context_dim": 768,
    "use_checkpoint": False,
    "legacy": False,
}

TINY_UNET: dict[str, Any] = {**SD15_UNET, "model_channels": 32, "num_res_blocks": 1}  # SD1.5 topology, narrow


def build_unet(config: dict[str, Any] = SD15_UNET, *, seed: int = 0, **overrides: Any) -> nn.Module:
    """An ldm UNetModel with seeded random weights (no zero-initialised layer left)."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(seed)
    unet = UNetModel(**{**config, **overrides})
    reinitialise(unet, seed=seed)
    return unet.eval().requires_grad_(False)


def reinitialise(module: nn.Module, *, seed: int = 0, std: float = 0.02) -> None:
    """Fill every parameter with small seeded noise (norm weights around 1), deterministic per seed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            is_norm_weight = name.endswith("weight") and p.ndim == 1
            p.copy_((1.0 + noise) if is_norm_weight else noise.to(p.dtype) * (5 if p.ndim > 1 else 1))
