"""Command line: `python -m lib_anydressing COMMAND ...`; `--help` after a command lists its options."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .anydressing_trainer import bench as bench_train
from .anydressing_trainer import builder as build_dataset
from .anydressing_trainer import cli as train
from .batch import bench as bench_batch
from .batch import cli as dress_batch
from .cli import bench, demo, selftest
from .convert import cli as convert
from .evaluation import cli as evaluation
from .garment_lora import bench as bench_lora
from .garment_lora import cli as train_lora
from .segment import bench as bench_sam
from .segment import bench_parse
from .tabs import cli as ui

# A1111 puts its own copies of these on sys.path only when it starts (ldm: the SD1.x/2.x model classes
# the trainers and benches build), so the WebUI's python run from the extension folder lacks them.
WEBUI_REPOSITORIES = ("stable-diffusion-stability-ai", "generative-models", "k-diffusion")
NO_LDM = (
    "the 'ldm' package (Stability-AI's stablediffusion) is not importable. Run this with the WebUI's python "
    "from extensions/<this extension> of an A1111 WebUI, or set ANYDRESSING_WEBUI to the WebUI's folder; "
    "elsewhere (Forge, a bare python) install it: pip install --no-deps stable-diffusion-sdkit==2.1.5"
)


def webui_repositories(package_dir: Path, webui: str | None = None) -> list[Path]:
    """The A1111 repositories/ folders to import from: of `webui` if given, else of the WebUI this
    extension sits in (<webui>/extensions/<extension>/lib_anydressing; symbolic links not followed)."""
    root = Path(webui) if webui else Path(os.path.abspath(package_dir)).parents[2]
    return [root / "repositories" / name for name in WEBUI_REPOSITORIES if (root / "repositories" / name).is_dir()]


COMMANDS = (
    ("demo", demo, "dress a generated image in the two garments of tests/data, end to end"),
    ("selftest", selftest, "check AnyDressing in a running WebUI through its HTTP API (PASS/FAIL table)"),
    ("bench", bench, "cost of dressing against the plain UNet (ratios; memory on CUDA)"),
    ("convert", convert, "convert a MagicClothing or IMAGDressing checkpoint to this extension's format"),
    ("ui", ui, "serve the AnyDressing tab (Segment garment, Train garment LoRA) on localhost"),
    ("bench-sam", bench_sam, "what a segmentation click costs, embedding cached and recomputed"),
    ("bench-parse", bench_parse, "what parsing a photo costs (Mask from garments, Split outfit), and from the cache"),
    ("train-lora", train_lora, "train a garment LoRA (kohya format) from a dataset folder, headless"),
    ("bench-lora", bench_lora, "garment LoRA training speed and memory, with and without the memory savers"),
    ("build-dataset", build_dataset, "turn photos + garment images into an AnyDressing training set"),
    ("train", train, "train an AnyDressing model (GarmentsNet, GFE LoRAs, Dressing-Attention)"),
    ("bench-train", bench_train, "AnyDressing training speed and memory, with and without gradient checkpointing"),
    ("dress-batch", dress_batch, "dress a catalog from a JSONL manifest, resumable, in this process or on Ray"),
    ("bench-batch", bench_batch, "batch throughput on the demo model: in this process and through a local Ray cluster"),
    ("eval", evaluation, "CLIP-T / CLIP-I / CLIP-AS / CLIP-I* of generated images, as in the paper's Table 1"),
)


def main(argv: list[str] | None = None) -> int:
    for folder in webui_repositories(Path(__file__).parent, os.environ.get("ANYDRESSING_WEBUI")):
        if str(folder) not in sys.path:
            sys.path.append(str(folder))
    parser = argparse.ArgumentParser(prog="python -m lib_anydressing", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, module, text in COMMANDS:
        sub = commands.add_parser(
            name, help=text, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.add_arguments(sub)
        sub.set_defaults(run=module.main)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "ldm":
            raise
        print(f"{args.command}: {NO_LDM}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
