"""Builds ldm UNets of the SD1.5 topology (the real class the WebUI runs) for the bench, demo and tests.

Weights are re-initialised: a fresh ldm UNet zero-initialises its output convolutions and would
output exactly zero, which would hide every difference a test or benchmark looks for.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .architectures import SD15_UNET, TINY_TEXT, TINY_UNET, TINY_VAE, build_autoencoder
from .checkpoint import StableDiffusion
from .tokenizer import tiny_clip_tokenizer


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


def tiny_stable_diffusion(seed: int = 0, *, prediction: str = "eps", **unet_overrides: Any) -> StableDiffusion:
    """The real classes with tiny configs and seeded random weights (tests, benches); no file is read."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_clip_tokenizer()
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_act="quick_gelu", **TINY_TEXT)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config)
    reinitialise(text_encoder, seed=seed + 1)
    vae = build_autoencoder(TINY_VAE, embed_dim=4)
    reinitialise(vae, seed=seed + 2)
    # SD1.5's two res blocks per level: kohya's key names (diffusers block numbers) assume that layout
    overrides = {"context_dim": TINY_TEXT["hidden_size"], "num_res_blocks": 2, **unet_overrides}
    unet = build_unet(TINY_UNET, seed=seed, **overrides)
    model = StableDiffusion(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, prediction=prediction)
    for module in model.modules().values():
        module.eval().requires_grad_(False)
    return model
