"""The architectures as the real ldm classes take them: configs (SD1.5, SDXL's UNet, and the tiny ones of tests
and benches), and the error every reader of a model that does not fit raises."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..files.weights import WeightsFileError

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

# SDXL's UNet (sgm's sd_xl_base.yaml): three levels, no attention at the top one, transformer depth per level
# [0, 2, 10] (the middle block takes the last), 64-channel heads, linear proj_in/out, 2048-wide context and a
# 2816-wide pooled input `y`. sgm cannot be installed from a registry: random_models.build_unet gives ldm's
# UNetModel these depths and sgm's label_emb, which yields SDXL's module tree and key names.
SDXL_UNET: dict[str, Any] = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "attention_resolutions": [4, 2],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 4],
    "num_head_channels": 64,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": True,
    "transformer_depth": [0, 2, 10],
    "context_dim": 2048,
    "adm_in_channels": 2816,
    "use_checkpoint": False,
    "legacy": False,
}
# SDXL's topology (levels, depths, linear projections, pooled input), narrow, with narrow text and pooled inputs
TINY_SDXL_UNET: dict[str, Any] = {
    **SDXL_UNET,
    "model_channels": 32,
    "num_head_channels": 8,
    "context_dim": 64,
    "adm_in_channels": 48,
}

TINY_VAE: dict[str, Any] = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "dropout": 0.0,
}
SD_VAE: dict[str, Any] = {**TINY_VAE, "ch": 128, "num_res_blocks": 2}  # SD1.x's VAE shape
SD15_TEXT: dict[str, Any] = {  # SD1.x's text width with one layer: the benches' text encoder
    "hidden_size": SD15_UNET["context_dim"],
    "intermediate_size": 4 * SD15_UNET["context_dim"],
    "num_hidden_layers": 1,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
}
TINY_TEXT: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 1,
    "max_position_embeddings": 77,
}


class SDCheckpointError(WeightsFileError):
    """A checkpoint that cannot be used as an SD1.x model, with a message meant for the user."""


def build_autoencoder(config: dict[str, Any], embed_dim: int) -> nn.Module:
    """An ldm AutoencoderKL of this shape, weights uninitialised (to be loaded or reinitialised)."""
    from ldm.models.autoencoder import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=config, lossconfig={"target": "torch.nn.Identity"}, embed_dim=embed_dim)
    return vae.to_empty(device="cpu")
