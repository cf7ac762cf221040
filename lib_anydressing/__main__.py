"""Command line: `python -m lib_anydressing COMMAND ...`; `--help` after a command lists its options."""

from __future__ import annotations

import argparse
import sys

from . import bench, demo
from .convert import cli as convert
from .evaluation import cli as evaluation
from .garment_lora import bench as bench_lora
from .garment_lora import cli as train_lora
from .segment import bench as bench_sam
from .training import bench as bench_train
from .training import builder as build_dataset
from .training import cli as train
from .ui import cli as ui

COMMANDS = (
    ("demo", demo, "dress a generated image in the two garments of tests/data, end to end"),
    ("bench", bench, "cost of dressing against the plain UNet (ratios; memory on CUDA)"),
    ("convert", convert, "convert a MagicClothing or IMAGDressing checkpoint to this extension's format"),
    ("ui", ui, "serve the AnyDressing tab (Segment garment, Train garment LoRA) on localhost"),
    ("bench-sam", bench_sam, "what a segmentation click costs, embedding cached and recomputed"),
    ("train-lora", train_lora, "train a garment LoRA (kohya format) from a dataset folder, headless"),
    ("bench-lora", bench_lora, "garment LoRA training speed and memory, with and without the memory savers"),
    ("build-dataset", build_dataset, "turn photos + garment images into an AnyDressing training set"),
    ("train", train, "train an AnyDressing model (GarmentsNet, GFE LoRAs, Dressing-Attention)"),
    ("bench-train", bench_train, "AnyDressing training speed and memory, with and without gradient checkpointing"),
    ("eval", evaluation, "CLIP-T / CLIP-I / CLIP-AS / CLIP-I* of generated images, as in the paper's Table 1"),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib_anydressing", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, module, text in COMMANDS:
        sub = commands.add_parser(
            name, help=text, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.add_arguments(sub)
        sub.set_defaults(run=module.main)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
