"""DDIM sampling with garment guidance, for the demo and checks outside the WebUI.

Two guidance layouts, both with explicit conditional rows for the Dresser:
- 2-way [text + garments, uncond]: docs/method.md CFG, eps = w * eps(z, text, garments) + (1 - w) * eps(z).
- 3-way [text + garments, garments only, uncond]: MagicClothing's joint guidance, a separate garment scale:
  eps = eps_u + w * (eps_text - eps_garments) + w_g * (eps_garments - eps_u).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

import torch
from torch import Tensor


def sd_alphas_cumprod(n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """Stable Diffusion's "scaled linear" noise schedule."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def guidance_layout(batch: int, garment_guidance: float | None) -> tuple[int, list[int]]:
    """(copies of the latent batch, rows that see the garments) for a guidance mode."""
    copies = 2 if garment_guidance is None else 3
    return copies, list(range(batch * (copies - 1)))


def combine_guidance(eps: Tensor, guidance: float, garment_guidance: float | None = None) -> Tensor:
    """Combine the predictions of the rows laid out by `guidance_layout`."""
    if garment_guidance is None:
        cond, uncond = eps.chunk(2)
        return guidance * cond + (1 - guidance) * uncond
    text, garments, uncond = eps.chunk(3)
    return uncond + guidance * (text - garments) + garment_guidance * (garments - uncond)


@torch.no_grad()
def ddim_sample(
    eps_model: Callable[[Tensor, Tensor], Tensor],
    noise: Tensor,
    *,
    steps: int = 20,
    guidance: float = 6.0,
    garment_guidance: float | None = None,
    on_step: Callable[[int], None] | None = None,
) -> Tensor:
    """Deterministic DDIM (eta = 0). `eps_model(x, t)` gets the rows of `guidance_layout` stacked."""
    loop = ddim_steps(eps_model, noise, steps=steps, guidance=guidance, garment_guidance=garment_guidance,
                      on_step=on_step)  # fmt: skip
    last = deque(loop, maxlen=1)
    return last[0] if last else noise


def ddim_steps(
    eps_model: Callable[[Tensor, Tensor], Tensor],
    noise: Tensor,
    *,
    steps: int = 20,
    guidance: float = 6.0,
    garment_guidance: float | None = None,
    on_step: Callable[[int], None] | None = None,
) -> Iterator[Tensor]:
    """`ddim_sample` one step at a time: yields the latent after each step (benches interleave loops)."""
    abar = sd_alphas_cumprod()
    timesteps = torch.linspace(len(abar) - 1, 0, steps).round().long()
    x = noise
    for i, t in enumerate(timesteps):
        if on_step is not None:
            on_step(i)
        a_t = abar[t].to(x.dtype)
        a_prev = abar[timesteps[i + 1]].to(x.dtype) if i + 1 < steps else torch.tensor(1.0, dtype=x.dtype)
        copies, _ = guidance_layout(x.shape[0], garment_guidance)
        rows = torch.cat([x] * copies)
        with torch.no_grad():
            eps = combine_guidance(eps_model(rows, t.expand(rows.shape[0]).to(x.dtype)), guidance, garment_guidance)
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        yield x
