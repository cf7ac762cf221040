"""`python -m lib_anydressing bench --whole`: whole generations, plain against dressed, as the WebUI runs them.

One generation is a sampling loop of `steps` UNet calls on [conditional, unconditional] rows plus the
VAE decode. Dressed generations go through the WebUI's own DressingSession with the WebUI's default
options (training-free model, garment canvas from the token budget, fine-layer pooling): cold pays
the garments' VAE encode and GarmentsNet pass, warm finds the features in the cache.

The plain and the dressed loop run in lockstep on two copies of one UNet, one step of each in turn,
so a change of machine load mid-run weighs on both alike; cold and warm differ only in the session's
preparation (the same dressed steps follow), which is timed for each. Every part is the fastest of
`repeats` rounds (noise only ever adds time).
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from ..engine import AnyDressingModel
from ..generation.model_files import TRAINING_FREE
from ..generation.options import from_values
from ..generation.prepare import FeatureCache
from ..generation.session import DressingSession, HostContext
from ..sd.architectures import SD15_UNET, SD_VAE, build_autoencoder
from ..sd.attention import sdp_attention
from ..sd.checkpoint import LATENT_SCALE
from ..sd.random_models import build_unet, reinitialise
from ..sd.sampling import ddim_steps
from .demo import DEFAULT_GARMENTS

GUIDANCE = 7.0  # the WebUI's default CFG scale


def run_whole_bench(
    *,
    n_garments: tuple[int, ...] = (1, 2, 4),
    latent_hw: tuple[int, int] = (48, 32),
    steps: int = 20,
    options: dict[str, Any] | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    repeats: int = 1,
    model_channels: int = 320,
    vae_channels: int = 128,
) -> dict:
    """`options` are the AnyDressing settings as the API takes them (WebUI defaults when absent)."""
    dev = torch.device(device)
    unet = build_unet(SD15_UNET, model_channels=model_channels).to(dev, dtype)
    plain_unet = copy.deepcopy(unet)  # before any forward patch: a copy's patches must call its own modules
    for u in (unet, plain_unet):
        sdp_attention(u)  # the WebUI's attention, not ldm's slower einsum
    vae = build_autoencoder({**SD_VAE, "ch": vae_channels}, embed_dim=4).eval().requires_grad_(False)
    reinitialise(vae, seed=1)
    vae.to(dev, dtype)
    bench = _Bench(unet, plain_unet, vae, latent_hw, steps, dev, dtype)
    images = [Image.open(p).convert("RGB") for p in DEFAULT_GARMENTS]
    sessions = {n: _session(bench.model, images, n, options or {}) for n in n_garments}
    with torch.no_grad():
        bench.round(sessions[n_garments[0]], n_steps=2)  # warm-up: first calls allocate and pick kernels
        rounds = [{n: bench.round(sessions[n]) for n in n_garments} for _ in range(repeats)]
    rows = []
    for n in n_garments:
        best = {part: min(r[n][part] for r in rounds) for part in rounds[0][n]}
        plain = best["plain_loop"] + best["decode"]
        dressed = best["dressed_loop"] + best["decode"]
        rows.append({
            "n_garments": n,
            "whole_ratio_warm": round((best["prepare_warm"] + dressed) / plain, 3),
            "whole_ratio_cold": round((best["prepare_cold"] + dressed) / plain, 3),
            "step_ratio": round(best["dressed_loop"] / best["plain_loop"], 3),
            **bench.tokens(sessions[n]),
            **({"whole_plain_s": round(plain, 3), "prepare_cold_s": round(best["prepare_cold"], 3),
                "dressed_loop_s": round(best["dressed_loop"], 3)} if dev.type == "cuda" else {}),
        })  # fmt: skip
    opts = sessions[n_garments[0]].opts
    return {
        "mode": "whole",
        "steps": steps,
        "image_wh": list(bench.target_wh),
        "resolution": opts.resolution,
        "detail": opts.detail,
        "fine_pool": opts.fine_pool,
        "model_channels": model_channels,
        "vae_channels": vae_channels,
        "device": str(dev),
        "dtype": str(dtype).replace("torch.", ""),
        "repeats": repeats,
        "garments": rows,
    }


class _Bench:
    """The two UNets, the VAE and the inputs of one bench run."""

    def __init__(self, unet: nn.Module, plain_unet: nn.Module, vae: nn.Module, latent_hw: tuple[int, int],
                 steps: int, dev: torch.device, dtype: torch.dtype) -> None:  # fmt: skip
        self.unet, self.plain_unet, self.vae = unet, plain_unet, vae
        self.steps, self.dev, self.dtype = steps, dev, dtype
        self.model = AnyDressingModel.training_free()
        self.garments_net = self.model.garments_net(unet)
        gen = torch.Generator().manual_seed(0)
        self.noise = torch.randn(1, 4, *latent_hw, generator=gen).to(dev, dtype)
        self.context = torch.randn(2, 77, SD15_UNET["context_dim"], generator=gen).to(dev, dtype)  # [cond, uncond]
        self.target_wh = (latent_hw[1] * 8, latent_hw[0] * 8)
        self.cache = FeatureCache()

    def round(self, session: DressingSession, n_steps: int | None = None) -> dict[str, float]:
        """Seconds of each part of one plain and one dressed generation, cold and warm."""
        n_steps = n_steps or self.steps
        self.cache.clear()
        times = {"prepare_cold": self._timed(lambda: self._prepare(session))}
        try:
            plain = ddim_steps(self._eps(self.plain_unet), self.noise, steps=n_steps, guidance=GUIDANCE)
            dressed = ddim_steps(self._eps(self.unet), self.noise, steps=n_steps, guidance=GUIDANCE,
                                 on_step=lambda i: session.on_step(i, n_steps, 1))  # fmt: skip
            times["plain_loop"] = times["dressed_loop"] = 0.0
            latents: Tensor = self.noise
            for _ in range(n_steps):  # one step of each in turn
                times["plain_loop"] += self._timed(lambda: next(plain))
                start = time.perf_counter()
                latents = next(dressed)
                times["dressed_loop"] += self._elapsed(start)
        finally:
            session.close()
        times["decode"] = self._timed(lambda: self.vae.decode(latents / LATENT_SCALE))
        times["prepare_warm"] = self._timed(lambda: self._prepare(session))
        session.close()
        return times

    def tokens(self, session: DressingSession) -> dict[str, Any]:
        """The garment canvas the token budget gave, and the garment tokens at the finest layer."""
        self._prepare(session)
        assert session.dresser is not None and session.prepared is not None
        h, w = session.prepared.features.latent_hw or (0, 0)
        finest = max(session.dresser.garment_tokens.values())
        session.close()
        return {"garment_canvas": [w * 8, h * 8], "garment_tokens_finest": finest,
                "image_tokens_finest": self.noise.shape[-2] * self.noise.shape[-1]}  # fmt: skip

    def _prepare(self, session: DressingSession) -> None:
        """What the WebUI does before sampling: garment features (cache or GarmentsNet), then install."""
        host = HostContext(self.dev, self.dtype, self._encode, self.context[1:])
        session.prepare(self.garments_net, host, target_wh=self.target_wh, cache=self.cache, model_key="bench")
        session.install(self.unet)

    def _encode(self, pixels: Tensor) -> Tensor:
        return self.vae.encode(pixels.to(self.dev, self.dtype)).mean * LATENT_SCALE

    def _eps(self, unet: nn.Module):
        return lambda x, t: unet(x, t, context=self.context)

    def _timed(self, fn) -> float:
        start = time.perf_counter()
        fn()
        return self._elapsed(start)

    def _elapsed(self, start: float) -> float:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        return time.perf_counter() - start


def _session(model: AnyDressingModel, images: list[Image.Image], n: int, options: dict[str, Any]) -> DressingSession:
    """A session with the options the WebUI would check, for n garments (the test images, repeated)."""
    slots = [{"image": images[i % len(images)].rotate(90 * (i // len(images)))} for i in range(n)]
    opts = from_values({"enabled": True, "model": TRAINING_FREE, **options}, slots)
    if opts.problems:
        raise ValueError("; ".join(opts.problems))
    return DressingSession(model, opts)
