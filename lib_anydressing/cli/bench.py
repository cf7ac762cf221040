"""`python -m lib_anydressing bench`: the cost of dressing, as ratios against the plain UNet in the same run.

Default: one UNet call of an SD1.5-shaped UNet (`--arch sdxl`: SDXL's) with random weights, N=2 garments on
the canvas the WebUI's defaults give them (token budget, fine-layer pooling), a latent in the proportions of a
512x768 (width x height) image scaled down to finish in about a minute on 2 CPU cores; pass
--latent 96 64 for the real size (SDXL at 832x1216: --latent 152 104). `--whole` times whole generations as
the WebUI runs them instead (bench_whole.py).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable

import torch
from PIL import Image

from ..engine import Dresser, DressingProjections, GarmentLoRA, GarmentsNet, self_attention_layers
from ..engine.token_pool import POOL_CHOICES
from ..files.bench_output import print_result
from ..generation.options import from_values
from ..generation.prepare import garment_canvas
from ..sd.architectures import SD15_UNET, SDXL_UNET
from ..sd.attention import sdp_attention
from ..sd.random_models import build_unet
from .bench_whole import run_whole_bench

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ARCHITECTURES = {"sd15": SD15_UNET, "sdxl": SDXL_UNET}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--whole", action="store_true", help="whole generations: sampling loop, CFG, cold and warm")
    parser.add_argument("--arch", choices=list(ARCHITECTURES), default="sd15", help="UNet topology (not --whole)")
    parser.add_argument("--n-garments", type=int, nargs="+", default=None, help="default: 2; --whole: 1 2 4")
    parser.add_argument("--latent", type=int, nargs=2, default=(48, 32), metavar=("H", "W"))
    parser.add_argument(
        "--garment-latent", type=int, nargs=2, default=None, metavar=("H", "W"), help="default: the WebUI's canvas"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: float16 on CUDA, else float32")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (minimum kept); default 3, --whole 1")
    parser.add_argument("--model-channels", type=int, default=320, help="UNet width (320 = SD1.5 and SDXL)")
    parser.add_argument("--resolution", type=int, default=0, help="garment canvas long side; 0: the token budget")
    parser.add_argument("--detail", type=float, default=1.0, help="the token budget's factor")
    parser.add_argument("--fine-pool", type=int, default=2, choices=POOL_CHOICES, help="s x s pooling, finest layers")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    whole = parser.add_argument_group("--whole")
    whole.add_argument("--steps", type=int, default=20)
    whole.add_argument("--vae-channels", type=int, default=128, help="VAE width (128 = SD)")


def main(args: argparse.Namespace) -> int:
    dtype = args.dtype or ("float16" if str(args.device).startswith("cuda") else "float32")
    options = {"resolution": args.resolution, "detail": args.detail, "fine_pool": args.fine_pool}
    if args.whole:
        if args.arch != "sd15":
            raise SystemExit("--whole times SD1.5-shaped generations only")
        result = run_whole_bench(
            n_garments=tuple(args.n_garments or (1, 2, 4)),
            latent_hw=tuple(args.latent),
            steps=args.steps,
            options=options,
            device=args.device,
            dtype=DTYPES[dtype],
            repeats=args.repeats or 1,
            model_channels=args.model_channels,
            vae_channels=args.vae_channels,
        )
        print_result(result, args.json)
        return 0
    n = (args.n_garments or [2])[0]
    if args.garment_latent is None:  # the canvas the WebUI would use for n garments without regions
        slots = from_values({}, [{"image": Image.new("RGB", (8, 8))}] * n).slots
        w, h = garment_canvas((args.latent[1] * 8, args.latent[0] * 8), slots, args.resolution, args.detail)
        args.garment_latent = (h // 8, w // 8)
    result = run_bench(
        n_garments=n,
        latent_hw=tuple(args.latent),
        garment_latent_hw=tuple(args.garment_latent),
        device=args.device,
        dtype=DTYPES[dtype],
        repeats=args.repeats or 3,
        model_channels=args.model_channels,
        fine_pool=args.fine_pool,
        arch=args.arch,
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
    fine_pool: int = 2,
    arch: str = "sd15",
) -> dict:
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    config = ARCHITECTURES[arch]
    unet = build_unet(config, model_channels=model_channels).to(dev)
    sdp_attention(unet)  # the WebUI's attention, not ldm's slower einsum
    if cuda and dtype != torch.float32:
        unet = unet.to(dtype)  # half weights under autocast, as A1111 runs on CUDA
    autocast = torch.autocast(dev.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, *latent_hw, generator=gen).to(dev)  # rows: [conditional, unconditional]
    t = torch.full((2,), 500.0, device=dev)
    context = torch.randn(2, 77, config["context_dim"], generator=gen).to(dev)
    pooled_dim = config.get("adm_in_channels")  # SDXL's pooled text and size input
    pooled = {"y": torch.randn(2, pooled_dim, generator=gen).to(dev)} if pooled_dim else {}
    garments = torch.randn(n_garments, 4, *garment_latent_hw, generator=gen).to(dev)
    dims = {layer.name: (layer.dim, layer.inner_dim) for layer in self_attention_layers(unet)}
    lora = GarmentLoRA(dims, n_slots=max(n_garments, 2), rank=16, alpha=16).to(dev).requires_grad_(False)
    projections = DressingProjections.from_unet(unet).requires_grad_(False)
    gnet = GarmentsNet(unet, shared=True, lora=lora)

    def step() -> None:
        unet(x, t, context=context, **pooled)

    with torch.no_grad(), autocast:
        features = gnet.extract(garments, dtype=dtype if cuda else None)
        dressers = {
            "dressing": Dresser(unet, features, projections, strength=0.7, fine_pool=fine_pool),
            "peer": Dresser(unet, features, projections, strength=0.7, recompute_kv=True),  # as peers run: no pooling
            "joint": Dresser(unet, features, None, strength=1.0, fine_pool=fine_pool),
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
            "fine_pool": fine_pool,
            "model_channels": model_channels,
            "arch": arch,
            "features_mb": round(features.nbytes / 2**20, 2),
            "device": str(dev),
            "dtype": str(dtype).replace("torch.", ""),
        }
        if cuda:
            result.update(
                plain_step_ms=round(plain * 1000, 2),
                dressing_step_ms=round(best["dressing"] * 1000, 2),
                extract_ms=round(best["extract"] * 1000, 2),
                **_peak_memory(unet, step, gnet, garments, projections, dtype, fine_pool),
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


def _peak_memory(unet, step, gnet, garments, projections, dtype, fine_pool) -> dict:
    """Peak allocated memory of a plain step, and of extraction + install + a dressed step."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    step()
    plain = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    features = gnet.extract(garments, dtype=dtype)
    with Dresser(unet, features, projections, fine_pool=fine_pool) as dresser:
        dresser.cond_rows = [0]
        step()
    dressing = torch.cuda.max_memory_allocated()
    return {"peak_mem_mb_plain": round(plain / 2**20, 1), "peak_mem_mb_dressing": round(dressing / 2**20, 1)}
