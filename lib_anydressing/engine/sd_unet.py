"""Builds ldm UNets of the SD1.5 topology (the real class the WebUI runs) for the bench, demo and tests.

Weights are re-initialised: a fresh ldm UNet zero-initialises its output convolutions and would
output exactly zero, which would hide every difference a test or benchmark looks for.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .forward_patch import ForwardPatch

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


def sdp_attention(unet: nn.Module) -> list[ForwardPatch]:
    """Every attention module of an ldm UNet through torch's scaled_dot_product_attention, as A1111's
    default optimisation on torch 2 ('sdp') and Forge run it; ldm's own einsum attention is slower, and
    a bench against it would flatter the dressed layers, which call SDPA. Restore with the patches."""
    patches = []
    for module in unet.modules():
        if all(hasattr(module, a) for a in ("to_q", "to_k", "to_v", "to_out", "heads")):
            patches.append(ForwardPatch(module, lambda inner, m=module: _sdp_forward(m)))
    return patches


def _sdp_forward(attn: nn.Module):
    def forward(x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        ctx = x if context is None else context
        q, k, v = (
            t.unflatten(-1, (attn.heads, -1)).transpose(1, 2) for t in (attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx))
        )
        return attn.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(-2))

    return forward
