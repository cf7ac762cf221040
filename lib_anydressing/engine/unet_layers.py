"""Finds the self-attention layers that Dressing-Attention patches, in any ldm-family UNet.

A1111's ldm, A1111's sgm (SDXL) and Forge's backend all name the tree the same way:
input_blocks / middle_block / output_blocks -> SpatialTransformer -> transformer_blocks ->
BasicTransformerBlock(attn1, attn2). Walking names instead of classes keeps the engine free of
any one implementation's imports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

_GROUPS = ("input_blocks", "middle_block", "output_blocks")


@dataclass(frozen=True)
class SelfAttentionLayer:
    """One BasicTransformerBlock's self-attention, named relative to the UNet."""

    name: str
    block: nn.Module
    attn: nn.Module

    @property
    def dim(self) -> int:
        return self.attn.to_q.in_features

    @property
    def inner_dim(self) -> int:
        return self.attn.to_q.out_features


def self_attention_layers(unet: nn.Module) -> list[SelfAttentionLayer]:
    """Every transformer block's attn1 under input/middle/output blocks, in forward order."""
    layers = []
    for name, module in unet.named_modules():
        if name.split(".", 1)[0] not in _GROUPS:
            continue
        if not all(hasattr(module, a) for a in ("attn1", "attn2", "norm1")):
            continue
        if getattr(module, "disable_self_attn", False):
            continue  # attn1 attends to the text there: not a self-attention layer
        layers.append(SelfAttentionLayer(name, module, module.attn1))
    return layers


def context_dim(unet: nn.Module) -> int | None:
    """Width of the text embedding the UNet's cross-attention takes (768 SD1.x, 1024 SD2, 2048 SDXL)."""
    for layer in self_attention_layers(unet):
        return layer.block.attn2.to_k.in_features
    return None


def architecture(unet: nn.Module) -> str:
    """A short name for the UNet family, used to refuse checkpoints made for another one."""
    ctx = context_dim(unet)
    return {768: "sd15", 1024: "sd2", 2048: "sdxl"}.get(ctx, f"unknown(context_dim={ctx})")


def token_grid(n_tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a layer's token grid, from its token count and the UNet input's latent size.

    Each ldm down-sampling halves the size rounding up (stride-2 conv, padding 1).
    """
    h, w = latent_hw
    for _ in range(8):
        if h * w == n_tokens:
            return h, w
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    raise ValueError(f"{n_tokens} tokens do not match any level of a {latent_hw[0]}x{latent_hw[1]} latent")


def module_key(layer_name: str) -> str:
    """A layer name usable as an nn.ModuleDict key (which cannot hold dots)."""
    return layer_name.replace(".", "_")


def input_channels(unet: nn.Module) -> int:
    """Latent channels the UNet takes: 4, or 9 / 8 for inpainting / instruct-pix2pix models."""
    return next(m for m in unet.modules() if isinstance(m, nn.Conv2d)).in_channels
