"""`python -m lib_anydressing bench --whole`: whole generations, plain against dressed, as the WebUI runs them.

One generation is a sampling loop of `steps` UNet calls on [conditional, unconditional] rows plus the
VAE decode. Dressed generations go through the WebUI's own DressingSession with the WebUI's default
options (training-free model, garment canvas from the token budget, fine-layer pooling): cold pays
the garments' VAE encode and GarmentsNet pass, warm finds the features in the cache. All variants
alternate within each round, and each figure is the fastest round (noise only ever adds time).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from .demo import DEFAULT_GARMENTS
from .engine import AnyDressingModel
from .engine.sd_unet import SD15_UNET, build_unet, reinitialise, sdp_attention
from .generation.options import from_values
from .generation.prepare import FeatureCache
from .generation.session import DressingSession
from .model_files import TRAINING_FREE
from .sampling import ddim_sample
from .sd_checkpoint import LATENT_SCALE, SD_VAE, build_autoencoder

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
    sdp_attention(unet)  # the WebUI's attention, not ldm's slower einsum
    vae = build_autoencoder({**SD_VAE, "ch": vae_channels}, embed_dim=4).eval().requires_grad_(False)
    reinitialise(vae, seed=1)
    vae.to(dev, dtype)
    model = AnyDressingModel.training_free()
    garments_net = model.garments_net(unet)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 4, *latent_hw, generator=gen).to(dev, dtype)
    context = torch.randn(2, 77, SD15_UNET["context_dim"], generator=gen).to(dev, dtype)  # [cond, uncond]
    target_wh = (latent_hw[1] * 8, latent_hw[0] * 8)
    images = [Image.open(p).convert("RGB") for p in DEFAULT_GARMENTS]

    def encode(pixels: Tensor) -> Tensor:
        return vae.encode(pixels.to(dev, dtype)).mean * LATENT_SCALE

    def prepare(session: DressingSession, cache: FeatureCache) -> None:
        session.prepare(
            unet, garments_net, device=dev, dtype=dtype, target_wh=target_wh, encode=encode,
            empty_prompt=context[1:], cache=cache, model_key="bench",
        )  # fmt: skip

    def generate(session: DressingSession | None, cache: FeatureCache, n_steps: int) -> tuple[float, float]:
        """(whole seconds, sampling-loop seconds) of one generation."""
        start = time.perf_counter()
        on_step = None
        if session is not None:
            prepare(session, cache)
            session.install(unet)
            on_step = lambda i: session.on_step(i, n_steps, 1)  # noqa: E731
        try:
            loop = time.perf_counter()
            latents = ddim_sample(lambda x, t: unet(x, t, context=context), noise, steps=n_steps,
                                  guidance=GUIDANCE, on_step=on_step)  # fmt: skip
            loop = _elapsed(loop, dev)
            vae.decode(latents / LATENT_SCALE)
        finally:
            if session is not None:
                session.close()
        return _elapsed(start, dev), loop

    sessions = {n: _session(model, images, n, options or {}) for n in n_garments}
    caches = {n: FeatureCache() for n in n_garments}
    times: dict[str, list[tuple[float, float]]] = {"plain": []}
    with torch.no_grad():
        generate(None, caches[n_garments[0]], 2)  # warm-up: first calls allocate and pick kernels
        generate(sessions[n_garments[0]], caches[n_garments[0]], 2)
        for _ in range(repeats):
            times["plain"].append(generate(None, caches[n_garments[0]], steps))
            for n in n_garments:
                caches[n].clear()
                times.setdefault(f"cold{n}", []).append(generate(sessions[n], caches[n], steps))
                times.setdefault(f"warm{n}", []).append(generate(sessions[n], caches[n], steps))
    plain_whole, plain_loop = (min(t[i] for t in times["plain"]) for i in (0, 1))
    rows = []
    for n in n_garments:
        cold, warm = min(t[0] for t in times[f"cold{n}"]), min(t[0] for t in times[f"warm{n}"])
        warm_loop = min(t[1] for t in times[f"warm{n}"])
        session = sessions[n]
        prepare(session, caches[n])
        dresser = session.make_dresser(unet)
        dresser.prepare()
        rows.append({
            "n_garments": n,
            "whole_ratio_warm": round(warm / plain_whole, 3),
            "whole_ratio_cold": round(cold / plain_whole, 3),
            "step_ratio": round(warm_loop / plain_loop, 3),
            "garment_canvas": list(_canvas(session)),
            "garment_tokens_finest": max(dresser.garment_tokens.values()),
            "image_tokens_finest": latent_hw[0] * latent_hw[1],
            **({"whole_warm_s": round(warm, 3), "whole_cold_s": round(cold, 3)} if dev.type == "cuda" else {}),
        })  # fmt: skip
        session.close()
    opts = next(iter(sessions.values())).opts
    return {
        "mode": "whole",
        "steps": steps,
        "image_wh": list(target_wh),
        "resolution": opts.resolution,
        "detail": opts.detail,
        "fine_pool": opts.fine_pool,
        "model_channels": model_channels,
        "vae_channels": vae_channels,
        "device": str(dev),
        "dtype": str(dtype).replace("torch.", ""),
        **({"plain_whole_s": round(plain_whole, 3)} if dev.type == "cuda" else {}),
        "garments": rows,
    }


def _session(model: AnyDressingModel, images: list[Image.Image], n: int, options: dict[str, Any]) -> DressingSession:
    """A session with the options the WebUI would check, for n garments (the test images, repeated)."""
    slots = [{"image": images[i % len(images)].rotate(90 * (i // len(images)))} for i in range(n)]
    opts = from_values({"enabled": True, "model": TRAINING_FREE, **options}, slots)
    if opts.problems:
        raise ValueError("; ".join(opts.problems))
    return DressingSession(model, opts)


def _canvas(session: DressingSession) -> tuple[int, int]:
    """The garment canvas the session's features were extracted at, from their latent size."""
    assert session.prepared is not None and session.prepared.features.latent_hw is not None
    h, w = session.prepared.features.latent_hw
    return w * 8, h * 8


def _elapsed(start: float, dev: torch.device) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - start
