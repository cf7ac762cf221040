"""AnyDressing's training losses (docs/method.md IGL, GTL, LOSS): L = L_LDM + (lambda1 / m) L_loc + lambda2 L_texture.

Norms are the paper's squared L2 norms, i.e. sums over positions (and colour channels), not means;
the paper's small lambdas (0.01 / m for L_loc, 0.001 for L_texture) are sized for sums. A batch's
loss is the mean of its samples' losses.

- L_LDM: MSE between the UNet's prediction and its target (the noise for eps models, v for v models).
- L_loc (IGL): sum over the m Dressing-Attention layers of (1/N) sum_k ||A_k - M_k||^2, A_k the
  attention mass each query puts on garment k (`Dresser(record_attention_mass=True)`), M_k garment
  k's mask area-downsampled to that layer's token grid; (lambda1 / m) L_loc is lambda1 times the
  average over layers.
- L_texture (GTL), only for samples with t <= eta, 0 for the others: the one-step estimate
  z0_hat = (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) decoded by the VAE to I_hat, then
  L_perc = (1/N) sum_k DISTS(I_hat M_k, I M_k) and L_hf = (1/N) sum_k ||I_hat M'_k - I M'_k||^2 with
  M'_k = M_k Canny(I). Images are compared in [0, 1] (outside a mask: black). Canny(I) is fixed per
  sample: the dataset computes it once, on the full-precision target (item "edges").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..engine.unet_layers import token_grid
from ..sd.diffusion import predicted_x0


@dataclass
class LossSwitches:
    """Which terms count (ablations), and the paper's weights."""

    ldm: bool = True
    loc: bool = True
    perc: bool = True
    hf: bool = True
    lambda_loc: float = 0.01
    lambda_texture: float = 0.001
    eta: int = 350


def ldm_loss(pred: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(pred.float(), target.float())


def localization_loss(attention_mass: Mapping[str, Tensor], masks: Tensor, latent_hw: tuple[int, int]) -> Tensor:
    """Sum over layers of (1/N) sum_k ||A_k - M_k||^2, batch mean.

    attention_mass: layer -> (B, T, N) from the Dresser; masks: (B, N, H, W) in the image (or latent)
    frame; latent_hw: the UNet input's latent size, which fixes each layer's token grid.
    """
    if not attention_mass:
        raise ValueError("no attention mass recorded: was the Dresser built with record_attention_mass=True?")
    total = masks.new_zeros((), dtype=torch.float32)
    per_grid: dict[tuple[int, int], Tensor] = {}  # 16 layers share ~4 token grids: one resize each
    for mass in attention_mass.values():
        grid = token_grid(mass.shape[1], latent_hw)
        if grid not in per_grid:
            per_grid[grid] = F.interpolate(masks.float(), size=grid, mode="area").flatten(2).transpose(1, 2)
        total = total + ((mass.float() - per_grid[grid]) ** 2).sum(1).mean(1).mean(0)  # m: (B, T, N)
    return total


def perceptual_loss(
    decoded: Tensor, target: Tensor, masks: Tensor, dists: Callable[[Tensor, Tensor], Tensor]
) -> Tensor:
    """Per sample (B,): (1/N) sum_k DISTS(I_hat M_k, I M_k); images (B, 3, H, W) in [-1, 1], masks (B, N, H, W)."""
    b, n = masks.shape[:2]
    m = masks[:, :, None].to(decoded.dtype)
    x = (_unit(decoded)[:, None] * m).flatten(0, 1) * 2 - 1  # masked in [0, 1], given to DISTS in [-1, 1]
    y = (_unit(target)[:, None] * m).flatten(0, 1) * 2 - 1
    return dists(x, y).view(b, n).mean(1)


def high_frequency_loss(decoded: Tensor, target: Tensor, masks: Tensor, edges: Tensor) -> Tensor:
    """Per sample (B,): (1/N) sum_k ||I_hat M'_k - I M'_k||^2, M'_k = M_k * edges."""
    m = (masks * edges).unsqueeze(2).to(decoded.dtype)  # (B, N, 1, H, W)
    diff = _unit(decoded)[:, None] * m - _unit(target)[:, None] * m
    return (diff.float() ** 2).sum((2, 3, 4)).mean(1)


@dataclass
class TextureTarget:
    """What GTL compares against: the real image (B, 3, H, W) in [-1, 1], the garment masks (B, N, H, W),
    and the image's `canny_edges` (B, H, W), which L_hf needs."""

    image: Tensor
    masks: Tensor
    edges: Tensor | None = None


def texture_loss(
    decode: Callable[[Tensor], Tensor],
    z_t: Tensor,
    eps: Tensor,
    abar_t: Tensor,
    t: Tensor,
    target: TextureTarget,
    *,
    eta: int,
    dists: Callable[[Tensor, Tensor], Tensor] | None = None,
    hf: bool = True,
) -> tuple[Tensor, Tensor]:
    """(L_perc, L_hf) as batch means, 0 for samples with t > eta; only the samples with t <= eta are decoded.

    decode: scaled latents -> images in [-1, 1] (the VAE).
    """
    masks, edges = target.masks, target.edges
    zero = z_t.new_zeros((), dtype=torch.float32)
    keep = (t <= eta).nonzero().flatten()
    if keep.numel() == 0 or (dists is None and not hf):
        return zero, zero
    if hf and edges is None:
        raise ValueError("L_hf needs the target's Canny edges")
    decoded = decode(predicted_x0(z_t[keep], eps[keep], abar_t[keep]))
    image, m = target.image[keep].to(decoded.dtype), masks[keep]
    batch = z_t.shape[0]
    perc = perceptual_loss(decoded, image, m, dists).sum() / batch if dists is not None else zero
    high = high_frequency_loss(decoded, image, m, edges[keep, None].to(m)).sum() / batch if hf else zero
    return perc, high


def _unit(images: Tensor) -> Tensor:
    return (images + 1) / 2
