"""`python -m lib_anydressing convert --from magicclothing|imagdressing --in ... --out NAME.safetensors`."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import CONVERTERS, ConversionError, convert_to_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source", choices=list(CONVERTERS), required=True)
    parser.add_argument(
        "--in",
        dest="inputs",
        type=Path,
        nargs="+",
        required=True,
        help="MagicClothing: the stable_ckpt folder " "(or its two files); IMAGDressing: IMAGDressing-v1_512.pt",
    )
    parser.add_argument("--out", type=Path, required=True, help="e.g. models/anydressing/magicclothing.safetensors")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def main(args: argparse.Namespace) -> int:
    try:
        conversion = convert_to_file(args.source, args.inputs, args.out, overwrite=args.overwrite)
    except ConversionError as e:
        print(f"error: {e}")
        return 2
    print(conversion.summary())
    print(f"license: {conversion.model.info.license}")
    print(f"wrote {args.out}")
    return 0
