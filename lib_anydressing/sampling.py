"""DDIM sampling with garment guidance, for the demo and training-free checks outside the WebUI.

Rows are [conditional, unconditional]; only the conditional row sees the garments, and the guidance
follows PAPER.md eq. 16: eps = w * eps(z, text, garments) + (1 - w) * eps(z).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def sd_alphas_cumprod(n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """Stable Diffusion's "scaled linear" noise schedule."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


@torch.no_grad()
def ddim_sample(
    eps_model: Callable[[Tensor, Tensor], Tensor],
    noise: Tensor,
    *,
    steps: int = 20,
    guidance: float = 6.0,
    on_step: Callable[[int], None] | None = None,
) -> Tensor:
    """Deterministic DDIM (eta = 0). `eps_model(x, t)` gets the batch [x, x] and returns both predictions."""
    abar = sd_alphas_cumprod()
    timesteps = torch.linspace(len(abar) - 1, 0, steps).round().long()
    x = noise
    for i, t in enumerate(timesteps):
        if on_step is not None:
            on_step(i)
        a_t = abar[t].to(x.dtype)
        a_prev = abar[timesteps[i + 1]].to(x.dtype) if i + 1 < steps else torch.tensor(1.0, dtype=x.dtype)
        eps_c, eps_u = eps_model(torch.cat([x, x]), t.expand(2 * x.shape[0]).to(x.dtype)).chunk(2)
        eps = guidance * eps_c + (1 - guidance) * eps_u
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x
