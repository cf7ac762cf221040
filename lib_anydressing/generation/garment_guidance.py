"""MagicClothing's garment guidance inside the WebUI's own CFG step.

A1111 computes D = u + w (text - u) from its batch [conditional rows, unconditional rows]. One
extra row per image, the negative prompt with the garments, placed right after the conditional
rows, gives the garments-only prediction g; adding (w_g - w) (g - u) to D afterwards yields
u + w (text - g) + w_g (g - u), MagicClothing's joint guidance. The unconditional rows stay last,
so A1111's combine and its skipping of them work unchanged (no correction on a skipped step).
With AND prompts the text scale counts once per image.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def joint_guidance(
    denoised: Tensor, garments: Tensor, uncond: Tensor, scale: float, cfg_scale: float, keep: Tensor | None = None
) -> Tensor:
    """The WebUI's CFG result D = u + w (text - u) turned into u + w (text - g) + w_g (g - u):
    D + (w_g - w) (g - u), only where the image is generated (`keep`, inpainting's nmask)."""
    delta = (scale - cfg_scale) * (garments - uncond)
    return denoised + (delta if keep is None else delta * keep)


class GarmentGuidance:
    def __init__(self, scale: float) -> None:
        self.scale = scale
        self._layout: tuple[int, int] | None = None  # (conditional rows, images) of the current step
        self._garments: Tensor | None = None
        self._uncond: Tensor | None = None

    def expand(self, params: Any) -> int:
        """In on_cfg_denoiser: add the garments-only rows. Returns how many leading rows see garments."""
        n_cond = params.text_cond.shape[0]
        batch = params.x.shape[0] - n_cond
        self._garments = self._uncond = None
        if params.text_cond.shape[1] != params.text_uncond.shape[1]:  # prompts of different lengths: skip
            self._layout = None
            return n_cond
        self._layout = (n_cond, batch)

        def insert(t: Tensor) -> Tensor:
            return torch.cat([t[:n_cond], t[-batch:], t[n_cond:]])

        params.x, params.sigma = insert(params.x), insert(params.sigma)
        if isinstance(params.image_cond, Tensor) and params.image_cond.shape[0] == n_cond + batch:
            params.image_cond = insert(params.image_cond)
        params.text_cond = torch.cat([params.text_cond, params.text_uncond])
        return n_cond + batch

    def collect(self, x_out: Tensor) -> None:
        """In on_cfg_denoised: keep the garments-only and unconditional predictions of this step."""
        if self._layout is None:
            return
        n_cond, batch = self._layout
        self._garments = x_out[n_cond : n_cond + batch].clone()
        has_uncond = x_out.shape[0] == n_cond + 2 * batch
        self._uncond = x_out[n_cond + batch :].clone() if has_uncond else None

    def correct(self, denoised: Tensor, cfg_scale: float, keep: Tensor | None = None) -> Tensor:
        """In on_cfg_after_cfg: D + (w_g - w) (g - u), only where the image is generated (`keep` = nmask)."""
        if self._garments is None or self._uncond is None:
            return denoised
        return joint_guidance(denoised, self._garments, self._uncond, self.scale, cfg_scale, keep)
