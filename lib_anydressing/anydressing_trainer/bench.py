"""`python -m lib_anydressing bench-train`: seconds per training step and (CUDA) peak memory, with and
without gradient checkpointing, in the same run.

Default: SD1.5 shapes (UNet width 320, the SD VAE's 128 channels), a 512x384 (height x width) person
image with two 512x384 garments, batch 1, every loss on and GTL applied at every step (its VAE decode
and DISTS are the worst case). Weights are random: no SD or VGG file is needed. The text encoder is a
one-layer CLIP of SD's width, since it runs once per step without gradient. On a CPU pass smaller
sizes (--model-channels 64 --size 128 128) to finish in minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..files.bench_output import print_result
from ..files.images import canny_edges
from ..sd.random_models import sd15_shaped
from ..training.loop import PRECISIONS
from .config import TrainConfig
from .dists import DISTS
from .trainer import AnyDressingTrainer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, nargs=2, default=(512, 384), metavar=("H", "W"), help="person image")
    parser.add_argument("--garment-size", type=int, nargs=2, default=None, metavar=("H", "W"), help="default: --size")
    parser.add_argument("--n-garments", type=int, default=2)
    parser.add_argument("--model-channels", type=int, default=320, help="UNet width (320 = SD1.5)")
    parser.add_argument("--vae-channels", type=int, default=128, help="VAE width (128 = SD)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant, after one warm-up step")
    parser.add_argument("--mixed-precision", choices=PRECISIONS, default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):  # ldm prints while building
        result = run_bench_train(
            size=tuple(args.size),
            garment_size=tuple(args.garment_size or args.size),
            n_garments=args.n_garments,
            model_channels=args.model_channels,
            vae_channels=args.vae_channels,
            steps=args.steps,
            mixed_precision=args.mixed_precision,
            device=args.device,
        )
    print_result(result, args.json)
    return 0


def synthetic_item(size: tuple[int, int], garment_size: tuple[int, int], n_garments: int, seed: int = 0) -> dict:
    """One sample in the dataset's layout: random pixels, garment k's mask a horizontal band."""
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    masks = torch.zeros(n_garments, h, w)
    for k in range(n_garments):
        masks[k, k * h // n_garments : (k + 1) * h // n_garments] = 1
    person = torch.rand(3, h, w, generator=gen) * 2 - 1
    return {
        "person": person,
        "garments": torch.rand(n_garments, 3, *garment_size, generator=gen) * 2 - 1,
        "masks": masks,
        "edges": canny_edges(person[None])[0, 0],
        "slots": torch.arange(n_garments),
        "caption": "a shirt and a dress",
        "id": "bench",
    }


def run_bench_train(
    *,
    size: tuple[int, int] = (512, 384),
    garment_size: tuple[int, int] = (512, 384),
    n_garments: int = 2,
    model_channels: int = 320,
    vae_channels: int = 128,
    steps: int = 3,
    mixed_precision: str = "auto",
    device: str = "cpu",
) -> dict[str, Any]:
    from torchvision.models.vgg import cfgs, make_layers

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    sd = sd15_shaped(model_channels, vae_channels)
    vgg = make_layers(cfgs["D"])  # torchvision's VGG16 feature stack, random: the cost of L_perc, not its values
    dists = DISTS({f"features.{k}": v for k, v in vgg.state_dict().items()})
    item = synthetic_item(size, garment_size, n_garments)
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as out:
        for checkpointing in (False, True):
            cfg = TrainConfig(
                size=list(size),
                garment_size=list(garment_size),
                output_dir=out,
                gradient_checkpointing=checkpointing,
                mixed_precision=mixed_precision,
                uncond_dropout=0.0,
                eta=1000,  # GTL at every step
                num_workers=0,
                device=device,
                slots=[str(i) for i in range(max(n_garments, 2))],
            )
            trainer = AnyDressingTrainer(cfg, sd, [item], dists=dists, say=lambda _: None)
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
            trainer.train(steps=steps + 1)  # the loop's own per-step seconds, logged (the first is warm-up)
            with (Path(out) / "loss_log.csv").open(newline="", encoding="utf-8") as f:
                times = [float(row["seconds"]) for row in csv.DictReader(f)][-(steps + 1) :]
            shutil.rmtree(Path(out), ignore_errors=True)
            key = "checkpointing" if checkpointing else "plain"
            result[f"sec_per_step_{key}"] = round(statistics.median(times[1:]), 3)
            if cuda:
                result[f"peak_mem_mb_{key}"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
            result["amp_dtype"] = str(trainer.amp_dtype or torch.float32).replace("torch.", "")
            del trainer
    result.update(
        size=list(size),
        garment_size=list(garment_size),
        n_garments=n_garments,
        model_channels=model_channels,
        vae_channels=vae_channels,
        device=str(dev),
        torch_threads=torch.get_num_threads(),
    )
    return result


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
