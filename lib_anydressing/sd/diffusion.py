"""The diffusion parametrisations both trainers and the samplers share: what the UNet predicts (eps or v),
and the noise and clean latent recovered from its output (docs/method.md)."""

from __future__ import annotations

from torch import Tensor


def diffusion_target(x0: Tensor, noise: Tensor, abar_t: Tensor, prediction: str) -> Tensor:
    """What the UNet learns to predict: the noise ("eps"), or v = sqrt(abar) eps - sqrt(1 - abar) x0 ("v")."""
    if prediction == "eps":
        return noise
    if prediction == "v":
        a = _expand(abar_t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    raise ValueError(f"unknown prediction type {prediction!r} (eps or v)")


def predicted_noise(pred: Tensor, z_t: Tensor, abar_t: Tensor, prediction: str) -> Tensor:
    """eps_theta from the UNet's output, whatever it predicts."""
    if prediction == "eps":
        return pred
    if prediction == "v":
        a = _expand(abar_t, z_t)
        return a.sqrt() * pred + (1 - a).sqrt() * z_t
    raise ValueError(f"unknown prediction type {prediction!r} (eps or v)")


def predicted_x0(z_t: Tensor, eps: Tensor, abar_t: Tensor) -> Tensor:
    """The one-step estimate z0_hat = (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    a = _expand(abar_t, z_t)
    return (z_t - (1 - a).sqrt() * eps) / a.sqrt()


def _expand(abar_t: Tensor, like: Tensor) -> Tensor:
    return abar_t.to(like.dtype).view(-1, *[1] * (like.ndim - 1))
