"""`python -m lib_anydressing bench-lora`: garment LoRA training speed and memory, with and without the savers.

Both runs go through the real trainer in the same process, on an SD1.5-shaped (or with --arch sdxl an
SDXL-shaped, both text towers at SDXL's widths) UNet and an SD-shaped VAE with random weights, batch 1:
"plain" encodes the image with the VAE every step and uses AdamW; "savers" caches the latents, checkpoints
the UNet's blocks and uses 8-bit AdamW when bitsandbytes is installed (CUDA). Text embeddings are cached in
both (the text encoder is frozen).
On CUDA the runs use fp16 and report peak memory. --model-channels / --resolution shrink the model
for a quick CPU run. `--network locon|loha|lokr` trains that LyCORIS type in both runs and adds a plain
LoRA run, so `network_ratio` compares the two in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..files.bench_output import print_result
from ..sd.random_models import sd15_shaped, sdxl_shaped
from .kohya_lora import NETWORKS
from .trainer import Progress, TrainConfig, train_lora


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", choices=("sd15", "sdxl"), default="sd15", help="UNet topology (and text inputs)")
    parser.add_argument("--resolution", type=int, default=None, help="default: 512 (sd15), 1024 (sdxl)")
    parser.add_argument("--model-channels", type=int, default=320, help="UNet width (320 = SD1.5)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run (after 2 warm-up steps)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--network", choices=list(NETWORKS), default="lora", help="locon/loha/lokr: lycoris-lora")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    result = run_bench(
        arch=args.arch,
        resolution=args.resolution or (1024 if args.arch == "sdxl" else 512),
        model_channels=args.model_channels,
        steps=args.steps,
        device=torch.device(args.device),
        rank=args.rank,
        network=args.network,
    )
    print_result(result, args.json)
    return 0


def run_bench(
    *, arch: str = "sd15", resolution: int = 512, model_channels: int = 320, steps: int = 6, device: torch.device,
    rank: int = 16, network: str = "lora",
) -> dict[str, object]:  # fmt: skip
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    model = (sdxl_shaped if arch == "sdxl" else sd15_shaped)(model_channels).to(device, dtype)
    result: dict[str, object] = {
        "arch": arch,
        "device": str(device),
        "resolution": resolution,
        "model_channels": model_channels,
        "batch_size": 1,
        "precision": "fp16" if cuda else "fp32",
        "network": network,
    }
    plain = {"cache_latents": False, "gradient_checkpointing": False, "optimizer": "adamw", "network": network}
    runs = {
        "plain": plain,
        "savers": {"cache_latents": True, "gradient_checkpointing": True, "optimizer": "adamw8bit", "network": network},
    }
    if network != "lora":
        runs["lora"] = {**plain, "network": "lora"}
    with tempfile.TemporaryDirectory() as tmp:
        data = _dataset(Path(tmp) / "data", resolution)
        for name, savers in runs.items():
            config = TrainConfig(
                dataset_dir=data,
                output_dir=Path(tmp) / name,
                name=name,
                resolution=resolution,
                rank=rank,
                alpha=rank / 2,
                max_steps=steps + 2,
                epochs=steps + 2,
                save_every_epochs=0,
                mixed_precision="fp16" if cuda else "fp32",
                **savers,
            )
            stamps: list[float] = []
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            outcome = train_lora(model, config, on_progress=lambda p, s=stamps: _stamp(p, s, cuda))
            durations = np.diff(stamps)[1:]  # from the end of step 2 on: no warm-up in the figure
            result[f"sec_per_step_{name}"] = round(statistics.median(durations.tolist()), 4)
            if cuda:
                result[f"peak_mem_mb_{name}"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            if name == "savers":
                result["optimizer_savers"] = outcome_optimizer(outcome.output)
    result["step_ratio"] = round(result["sec_per_step_savers"] / result["sec_per_step_plain"], 3)
    if network != "lora":
        result["network_ratio"] = round(result["sec_per_step_plain"] / result["sec_per_step_lora"], 3)
    if cuda:
        result["mem_ratio"] = round(result["peak_mem_mb_savers"] / result["peak_mem_mb_plain"], 3)
    return result


def outcome_optimizer(path: Path | None) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata().get("ss_optimizer", "")


def _stamp(progress: Progress, stamps: list[float], cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()
    stamps.append(time.perf_counter())


def _dataset(folder: Path, resolution: int) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        pixels = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("garment")
    return folder
