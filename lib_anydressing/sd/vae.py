"""The KL VAE's posterior, computed one way for ldm's, sgm's (A1111's SDXL) and Forge's autoencoders.

Not through their `encode`: sgm's and Forge's sample the posterior there with the global RNG, and ldm's
returns a distribution object the others lack. All of them compute the moments as quant_conv(encoder(x)),
mean first (Forge may have no quant_conv).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def posterior_mean(vae: nn.Module, x: Tensor) -> Tensor:
    """The mean (the mode) of the posterior for images x in [-1, 1], unscaled."""
    return _moments(vae, x).chunk(2, dim=1)[0]


def posterior_moments(vae: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, std) of the posterior, unscaled; the log-variance clamped as ldm's DiagonalGaussianDistribution."""
    mean, logvar = _moments(vae, x).chunk(2, dim=1)
    return mean, torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))


def _moments(vae: nn.Module, x: Tensor) -> Tensor:
    moments = vae.encoder(x)
    if getattr(vae, "quant_conv", None) is not None:
        moments = vae.quant_conv(moments)
    return moments
