"""Builds ldm UNets of the SD1.5 topology (the real class the WebUI runs) for the bench, demo and tests.

Weights are re-initialised: a fresh ldm UNet zero-initialises its output convolutions and would
output exactly zero, which would hide every difference a test or benchmark looks for.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .architectures import SD15_TEXT, SD15_UNET, SD_VAE, TINY_TEXT, TINY_UNET, TINY_VAE, build_autoencoder
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


def random_stable_diffusion(
    *, unet: dict[str, Any], vae: dict[str, Any], text: dict[str, Any], seed: int = 0, prediction: str = "eps",
    **unet_overrides: Any,
) -> StableDiffusion:  # fmt: skip
    """The real classes at these configs with seeded random weights; no file is read. `text`: a CLIPTextConfig's
    sizes (the vocabulary is the tiny real tokenizer's)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_clip_tokenizer()
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_act="quick_gelu", **text)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config)
    reinitialise(text_encoder, seed=seed + 1)
    autoencoder = build_autoencoder(vae, embed_dim=4)
    reinitialise(autoencoder, seed=seed + 2)
    model = StableDiffusion(
        unet=build_unet(unet, seed=seed, **unet_overrides),
        vae=autoencoder,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        prediction=prediction,
    )
    for module in model.modules().values():
        module.eval().requires_grad_(False)
    return model


def tiny_stable_diffusion(seed: int = 0, *, prediction: str = "eps", **unet_overrides: Any) -> StableDiffusion:
    """The tests' model: SD1.5's topology, narrow, with two res blocks per level (kohya's key names, diffusers'
    block numbers, assume that layout)."""
    overrides = {"context_dim": TINY_TEXT["hidden_size"], "num_res_blocks": 2, **unet_overrides}
    return random_stable_diffusion(
        unet=TINY_UNET, vae=TINY_VAE, text=TINY_TEXT, seed=seed, prediction=prediction, **overrides
    )


def sd15_shaped(model_channels: int = 320, vae_channels: int = 128, seed: int = 0) -> StableDiffusion:
    """The benches' model: SD1.5's UNet (at this width) and VAE shapes, and a one-layer CLIP text encoder of
    SD's width (its cost is small next to the UNet's, and the trainers cache its output)."""
    return random_stable_diffusion(
        unet={**SD15_UNET, "model_channels": model_channels}, vae={**SD_VAE, "ch": vae_channels}, text=SD15_TEXT,
        seed=seed,
    )  # fmt: skip
