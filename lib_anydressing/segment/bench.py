"""`python -m lib_anydressing bench-sam`: what a click costs with the cached embedding, and without it.

Default: SAM vit_b's real architecture with random weights (timing does not depend on the weights),
a 1024x768 photo; `--checkpoint` times a real file. Both figures come from the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from ..files.bench_output import print_result
from .predictor import CachedPredictor
from .sam_models import build_sam, read_state_dict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variant", choices=["vit_b", "vit_l", "vit_h"], default="vit_b")
    parser.add_argument("--checkpoint", type=Path, default=None, help="a SAM .pth (default: random weights)")
    parser.add_argument("--clicks", type=int, default=5, help="cached clicks timed (median)")
    parser.add_argument("--reencodes", type=int, default=1, help="clicks timed with the embedding recomputed")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true")


def main(args: argparse.Namespace) -> int:
    if args.checkpoint is not None:
        model, variant = build_sam(read_state_dict(args.checkpoint))
    else:
        from segment_anything import sam_model_registry

        torch.manual_seed(0)
        model, variant = sam_model_registry[args.variant](), args.variant
    predictor = CachedPredictor(model.eval().to(args.device), "bench", max_images=1)
    image = np.random.default_rng(0).integers(0, 255, (768, 1024, 3), dtype=np.uint8)
    clicks = [(300.0 + 40 * i, 380.0) for i in range(args.clicks)]

    def click(point: tuple[float, float]) -> float:
        start = time.perf_counter()
        predictor.set_image(image)
        predictor.predict([point], [1])
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    with torch.no_grad():
        reencode = []
        for i in range(args.reencodes):
            predictor._cache.clear()  # what sd-webui-segment-anything does on every click
            reencode.append(click(clicks[i % len(clicks)]))
        cached = [click(p) for p in clicks]  # the embedding of the last re-encode is cached now
    result = {
        "click_latency_ms": round(statistics.median(cached) * 1000, 2),
        "reencode_latency_ms": round(statistics.median(reencode) * 1000, 2),
        "speedup": round(statistics.median(reencode) / statistics.median(cached), 1),
        "encoder_runs": predictor.encoder_runs,
        "variant": variant,
        "device": args.device,
        "image_hw": [768, 1024],
    }
    print_result(result, args.json)
    return 0
