"""`python -m lib_anydressing bench`: the cost of dressing, as ratios against the plain UNet in the same run.

Default: an SD1.5-shaped UNet with random weights, N=2 garments, latents in the proportions of a
512x768 (width x height) image with 512x384 garments, scaled down to finish in about 2 minutes on 2
CPU cores; pass --latent 96 64 --garment-latent 48 64 for the real sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable

import torch

from .bench_output import print_result
from .engine import Dresser, DressingProjections, GarmentLoRA, GarmentsNet, self_attention_layers
from .engine.sd_unet import SD15_UNET, build_unet

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n-garments", type=int, default=2)
    parser.add_argument("--latent", type=int, nargs=2, default=(48, 32), metavar=("H", "W"))
    parser.add_argument("--garment-latent", type=int, nargs=2, default=(24, 32), metavar=("H", "W"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: float16 on CUDA, else float32")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after a warm-up round (minimum)")
    parser.add_argument("--model-channels", type=int, default=320, help="UNet width (320 = SD1.5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    dtype = args.dtype or ("float16" if str(args.device).startswith("cuda") else "float32")
    result = run_bench(
        n_garments=args.n_garments,
        latent_hw=tuple(args.latent),
        garment_latent_hw=tuple(args.garment_latent),
        device=args.device,
        dtype=DTYPES[dtype],
        repeats=args.repeats,
        model_channels=args.model_channels,
    )
    print_result(result, args.json)
    return 0


def run_bench(
    *,
    n_garments: int = 2,
    latent_hw: tuple[int, int] = (48, 32),
    garment_latent_hw: tuple[int, int] = (24, 32),
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    repeats: int = 3,
    model_channels: int = 320,
) -> dict:
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    unet = build_unet(SD15_UNET, model_channels=model_channels).to(dev)
    if cuda and dtype != torch.float32:
        unet = unet.to(dtype)  # half weights under autocast, as A1111 runs on CUDA
    autocast = torch.autocast(dev.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, *latent_hw, generator=gen).to(dev)  # rows: [conditional, unconditional]
    t = torch.full((2,), 500.0, device=dev)
    context = torch.randn(2, 77, SD15_UNET["context_dim"], generator=gen).to(dev)
    garments = torch.randn(n_garments, 4, *garment_latent_hw, generator=gen).to(dev)
    dims = {layer.name: (layer.dim, layer.inner_dim) for layer in self_attention_layers(unet)}
    lora = GarmentLoRA(dims, n_slots=max(n_garments, 2), rank=16, alpha=16).to(dev).requires_grad_(False)
    projections = DressingProjections.from_unet(unet).requires_grad_(False)
    gnet = GarmentsNet(unet, shared=True, lora=lora)

    def step() -> None:
        unet(x, t, context=context)

    with torch.no_grad(), autocast:
        features = gnet.extract(garments, dtype=dtype if cuda else None)
        dressers = {
            "dressing": Dresser(unet, features, projections, strength=0.7),
            "peer": Dresser(unet, features, projections, strength=0.7, recompute_kv=True),
            "joint": Dresser(unet, features, None, strength=1.0),
        }
        for dresser in dressers.values():
            dresser.cond_rows = [0]  # rows are [conditional, unconditional]
        install = dressers["dressing"]
        times: dict[str, list[float]] = {name: [] for name in ("plain", "extract", "install", *dressers)}
        for _ in range(repeats + 1):  # the first round warms up; variants interleave so drift hits all alike
            times["plain"].append(_timed(step, dev))
            times["extract"].append(_timed(lambda: gnet.extract(garments), dev))
            times["install"].append(_timed(lambda: (install.install(), install.remove()), dev))
            for name, dresser in dressers.items():
                with dresser:
                    times[name].append(_timed(step, dev))
        best = {name: min(t[1:]) for name, t in times.items()}  # noise only ever adds time
        plain = best["plain"]
        result = {
            "step_ratio": round(best["dressing"] / plain, 3),
            "peer_step_ratio": round(best["peer"] / plain, 3),
            "training_free_step_ratio": round(best["joint"] / plain, 3),
            "extract_ratio": round(best["extract"] / plain, 3),
            "install_ratio": round(best["install"] / plain, 3),
            "n_garments": n_garments,
            "latent_hw": list(latent_hw),
            "garment_latent_hw": list(garment_latent_hw),
            "model_channels": model_channels,
            "device": str(dev),
            "dtype": str(dtype).replace("torch.", ""),
        }
        if cuda:
            result.update(
                plain_step_ms=round(plain * 1000, 2),
                dressing_step_ms=round(best["dressing"] * 1000, 2),
                extract_ms=round(best["extract"] * 1000, 2),
                **_peak_memory(unet, step, gnet, garments, projections, dtype),
            )
    return result


def _timed(fn: Callable[[], object], dev: torch.device) -> float:
    _sync(dev)
    start = time.perf_counter()
    fn()
    _sync(dev)
    return time.perf_counter() - start


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _peak_memory(unet, step, gnet, garments, projections, dtype) -> dict:
    """Peak allocated memory of a plain step, and of extraction + install + a dressed step."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    step()
    plain = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    features = gnet.extract(garments, dtype=dtype)
    with Dresser(unet, features, projections) as dresser:
        dresser.cond_rows = [0]
        step()
    dressing = torch.cuda.max_memory_allocated()
    return {"peak_mem_mb_plain": round(plain / 2**20, 1), "peak_mem_mb_dressing": round(dressing / 2**20, 1)}
