"""Builds ldm UNets (the real class A1111 runs) of the SD1.5 or SDXL topology for the bench, demo and tests.

Weights are re-initialised: a fresh ldm UNet zero-initialises its output convolutions and would
output exactly zero, which would hide every difference a test or benchmark looks for.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from .architectures import SD15_TEXT, SD15_UNET, SD_VAE, SDXL_UNET, TINY_TEXT, TINY_UNET, TINY_VAE, build_autoencoder
from .checkpoint import StableDiffusion
from .tokenizer import tiny_clip_tokenizer


def build_unet(config: dict[str, Any] = SD15_UNET, *, seed: int = 0, **overrides: Any) -> nn.Module:
    """An ldm UNetModel with seeded random weights (no zero-initialised layer left)."""
    torch.manual_seed(seed)
    unet = unet_structure({**config, **overrides})
    reinitialise(unet, seed=seed)
    return unet.eval().requires_grad_(False)


def unet_structure(config: dict[str, Any]) -> nn.Module:
    """ldm's UNetModel at `config`, weights as ldm initialises them (build it under torch.device("meta") to
    size a full model without its memory).

    SDXL's two differences from what ldm's constructor takes are applied to the built model: a transformer
    depth per level (built at the deepest, then each SpatialTransformer keeps its level's first blocks; the
    middle block the last level's), and `adm_in_channels`, the pooled input as sgm's "sequential" label_emb.
    """
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from ldm.modules.diffusionmodules.util import linear

    config = dict(config)
    depths = config.pop("transformer_depth", 1)
    adm_in_channels = config.pop("adm_in_channels", None)
    per_level = list(depths) if isinstance(depths, list | tuple) else None
    if adm_in_channels is not None:
        config["num_classes"] = "continuous"  # sets num_classes (forward then requires y); replaced below
    if per_level:  # ldm's SpatialTransformer takes one context width per block
        depths = max(per_level)
        config["context_dim"] = [config["context_dim"]] * depths
    unet = UNetModel(**config, transformer_depth=depths)
    if per_level:
        width_depth = {config["model_channels"] * m: d for m, d in zip(config["channel_mult"], per_level, strict=True)}
        for name, module in unet.named_modules():
            if hasattr(module, "transformer_blocks"):
                depth = per_level[-1] if name.startswith("middle_block") else width_depth[module.in_channels]
                module.transformer_blocks = nn.ModuleList(list(module.transformer_blocks)[:depth])
                module.__class__ = _sgm_spatial_transformer()
    if adm_in_channels is not None:
        emb = unet.time_embed[0].out_features
        unet.label_emb = nn.Sequential(nn.Sequential(linear(adm_in_channels, emb), nn.SiLU(), linear(emb, emb)))
    return unet


@functools.cache
def _sgm_spatial_transformer() -> type[nn.Module]:
    """ldm's SpatialTransformer wants one context per block; sgm's (generative-models 45c443b3,
    sgm/modules/attention.py) gives a single context to every block, which deeper-than-one SDXL levels need."""
    from ldm.modules.attention import SpatialTransformer

    class SgmSpatialTransformer(SpatialTransformer):
        def forward(self, x: torch.Tensor, context: Any = None) -> torch.Tensor:
            contexts = context if isinstance(context, list) else [context]
            if len(contexts) == 1:
                contexts = contexts * len(self.transformer_blocks)
            return super().forward(x, context=contexts)

    return SgmSpatialTransformer


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


def sdxl_shaped(model_channels: int = 320, vae_channels: int = 128, seed: int = 0) -> StableDiffusion:
    """The benches' SDXL: SDXL's UNet topology (at this width), SD's VAE shape, and both text towers at SDXL's
    widths (CLIP-L 768, bigG 1280 with its 1280 projection) with one layer each: their outputs are cached."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .sdxl import SDXL_LATENT_SCALE, SdxlText

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    clip_l = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_act="quick_gelu", **SD15_TEXT))
    g_sizes = {**SD15_TEXT, "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20}
    clip_g = CLIPTextModelWithProjection(
        CLIPTextConfig(vocab_size=len(tokenizer), hidden_act="gelu", projection_dim=1280, **g_sizes)
    )
    for i, module in enumerate((clip_l, clip_g)):
        reinitialise(module, seed=seed + 3 + i)
    text = SdxlText(clip_l, clip_g, tokenizer).eval().requires_grad_(False)
    vae = build_autoencoder({**SD_VAE, "ch": vae_channels}, embed_dim=4)
    reinitialise(vae, seed=seed + 2)
    return StableDiffusion(
        unet=build_unet({**SDXL_UNET, "model_channels": model_channels}, seed=seed),
        vae=vae.eval().requires_grad_(False), text_encoder=text, tokenizer=tokenizer,
        latent_scale=SDXL_LATENT_SCALE, conditioner=text,
    )  # fmt: skip
