"""Command line: `python -m lib_anydressing {demo,bench,convert,ui,bench-sam} ...`."""

from __future__ import annotations

import argparse
import sys

from . import bench, demo
from .convert import cli as convert
from .segment import bench as bench_sam
from .ui import cli as ui


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib_anydressing", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, module, text in (
        ("demo", demo, "dress a generated image in the two garments of tests/data, end to end"),
        ("bench", bench, "cost of dressing against the plain UNet (ratios; memory on CUDA)"),
        ("convert", convert, "convert a MagicClothing or IMAGDressing checkpoint to this extension's format"),
        ("ui", ui, "serve the AnyDressing tab (Segment garment) on localhost"),
        ("bench-sam", bench_sam, "what a segmentation click costs, embedding cached and recomputed"),
    ):
        sub = commands.add_parser(name, help=text, description=module.__doc__)
        module.add_arguments(sub)
        sub.set_defaults(run=module.main)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
