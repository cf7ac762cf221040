"""Fixtures: real ldm UNets (from stable-diffusion-sdkit) with small seeded random weights."""

from __future__ import annotations

import pytest
import torch

from lib_anydressing.sd.architectures import TINY_UNET
from lib_anydressing.sd.random_models import build_unet

LATENT = (24, 16)  # target latent (h, w): a 128x192 portrait, like 512x768 scaled down
GARMENT = (16, 16)


@pytest.fixture
def unet():
    return build_unet(TINY_UNET)


@pytest.fixture
def inputs():
    return unet_inputs(TINY_UNET["context_dim"])


def unet_inputs(context_dim: int, pooled_dim: int = 0) -> tuple[torch.Tensor, ...]:
    """(x, t, context) of two rows at LATENT, seeded; with `pooled_dim` also SDXL's pooled input y."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, *LATENT, generator=gen)
    t = torch.tensor([700.0, 700.0])
    context = torch.randn(2, 7, context_dim, generator=gen)
    return (x, t, context, torch.randn(2, pooled_dim, generator=gen)) if pooled_dim else (x, t, context)


@pytest.fixture
def garments():
    return torch.randn(2, 4, *GARMENT, generator=torch.Generator().manual_seed(2))


def run(unet, x, t, context):
    with torch.no_grad():
        return unet(x, t, context=context)
