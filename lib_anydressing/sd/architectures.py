"""The SD1.x architectures as the real ldm classes take them: configs (SD1.5 and the tiny ones of tests and
benches), and the error every reader of a model that does not fit raises."""

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
