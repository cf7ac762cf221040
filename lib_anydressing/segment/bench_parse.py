"""`python -m lib_anydressing bench-parse`: what parsing a photo for 'Mask from garments' / 'Split outfit'
costs, and what the parse cache saves when the same photo is dressed again.

Default: segformer-b2's architecture (the public clothes parsers' size) with random weights and the ATR
labels, written to a temporary folder and loaded through the real loader; `--parser` times a real folder.
A 768x1024 photo; both figures come from the same run.
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
from .parser import GarmentParser

ATR = (
    "Background", "Hat", "Hair", "Sunglasses", "Upper-clothes", "Skirt", "Pants", "Dress", "Belt", "Left-shoe",
    "Right-shoe", "Face", "Left-leg", "Right-leg", "Left-arm", "Right-arm", "Bag", "Scarf",
)  # fmt: skip
B2 = {"depths": [3, 4, 6, 3], "hidden_sizes": [64, 128, 320, 512], "decoder_hidden_size": 768}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--parser", type=Path, default=None, help="a parser folder (default: random segformer-b2)")
    parser.add_argument("--photos", type=int, default=3, help="distinct photos parsed (median)")
    parser.add_argument("--repeats", type=int, default=5, help="parses of the same photo from the cache (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true")


def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.parser or _random_b2(Path(tmp))
        parser = GarmentParser(folder, args.device, cache_size=args.photos + 1)
        rng = np.random.default_rng(0)
        photos = [Image.fromarray(rng.integers(0, 255, (1024, 768, 3), dtype=np.uint8)) for _ in range(args.photos)]
        parser.parts(photos[0])  # warm-up: first-call allocations and kernels are not a parse's cost
        parser._cache.clear()
        parse = [_timed(parser.parts, photo, args.device) for photo in photos]
        cached = [_timed(parser.parts, photos[-1], args.device) for _ in range(args.repeats)]
    result = {
        "parse_ms": round(statistics.median(parse) * 1000, 1),
        "cached_parse_ms": round(statistics.median(cached) * 1000, 2),
        "speedup": round(statistics.median(parse) / statistics.median(cached), 1),
        "parser": str(args.parser) if args.parser else "segformer-b2 (random weights, ATR labels)",
        "parameters_m": round(sum(p.numel() for p in parser.model.parameters()) / 1e6, 1),
        "device": args.device,
        "image_wh": [768, 1024],
    }
    print_result(result, args.json)
    return 0


def _random_b2(folder: Path) -> Path:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    config = SegformerConfig(num_labels=len(ATR), id2label=dict(enumerate(ATR)), **B2)
    torch.manual_seed(0)
    SegformerForSemanticSegmentation(config).save_pretrained(str(folder), safe_serialization=True)
    return folder


def _timed(parse, photo: Image.Image, device: str) -> float:
    start = time.perf_counter()
    parse(photo)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start
