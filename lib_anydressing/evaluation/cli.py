"""`python -m lib_anydressing eval --config eval.toml` (or flags): CLIP-T / CLIP-I / CLIP-AS / CLIP-I* table.

Config (TOML; keys at the top level or under [eval]; relative paths are relative to the config file;
flags override it):

    clip = "models/clip-vit-large-patch14"        # local transformers CLIP folder (CLIP-T, CLIP-I, CLIP-I*)
    aesthetic = "models/sac+logos+ava1-l14-linearMSE.pth"   # optional: CLIP-AS
    aesthetic_clip = "models/clip-vit-large-patch14"        # optional: the ViT-L/14 the predictor needs
    manifest = "eval/cases.jsonl"
    images = ["outputs/anydressing", "outputs/magicclothing"]   # one table row per folder
    device = "cuda"
    out = "results.json"                         # optional: the JSON (per-sample scores included)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from ..files.config import ConfigFileError, read_toml
from ..files.settings_model import Field, Settings, ValidationError, problems_of
from ..files.weights import WeightsFileError

PATH_KEYS = ("clip", "aesthetic", "aesthetic_clip", "manifest", "out")


class ConfigError(ValueError):
    """A config or flag problem, with a message meant for the user."""


class EvalConfig(Settings):
    """The evaluation's settings (the module docstring shows them in a file)."""

    clip: Path
    manifest: Path
    images: list[Path] = Field(
        default_factory=list
    )  # folders of generated images, one table row each; none: the manifest's own
    aesthetic: Path | None = None
    aesthetic_clip: Path | None = None
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    out: Path | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML file with the settings below")
    parser.add_argument("--manifest", type=Path, help="evaluation manifest (JSONL)")
    parser.add_argument("--images", type=Path, nargs="+", help="folders of generated images named <id>.png")
    parser.add_argument("--clip", type=Path, help="local CLIP folder (config.json, weights, processor files)")
    parser.add_argument("--aesthetic", type=Path, help="LAION improved-aesthetic-predictor state dict (.pth)")
    parser.add_argument("--aesthetic-clip", dest="aesthetic_clip", type=Path, help="CLIP ViT-L/14 folder for it")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")


def read_config(path: Path) -> dict[str, Any]:
    try:
        data = read_toml(path, path_keys=(*PATH_KEYS, "images"))
    except ConfigFileError as e:
        raise ConfigError(str(e)) from e
    data = data.get("eval", data)
    if isinstance(data.get("images"), str):
        data["images"] = [data["images"]]
    return data


def settings(args: argparse.Namespace) -> EvalConfig:
    """Config file values overridden by the flags given."""
    merged = read_config(args.config) if args.config else {}
    for key in (*PATH_KEYS, "images", "device"):
        if getattr(args, key) is not None:
            merged[key] = getattr(args, key)
    for key in ("clip", "manifest"):
        if not merged.get(key):
            raise ConfigError(f"no {key}: give --{key} or '{key}' in the config")
    try:
        return EvalConfig(**merged)
    except ValidationError as e:
        raise ConfigError(problems_of(e)) from e


def main(args: argparse.Namespace) -> int:
    # imported here: the other commands of `python -m lib_anydressing` need not load transformers
    from .aesthetic import load_aesthetic_head
    from .clip_models import ClipEncoder
    from .evaluate import evaluate, table

    try:
        s = settings(args)
        encoder = ClipEncoder.from_folder(s.clip, s.device)
        head, head_encoder = None, None
        if s.aesthetic:
            head = load_aesthetic_head(s.aesthetic).to(s.device)
            if s.aesthetic_clip and Path(s.aesthetic_clip) != Path(s.clip):
                head_encoder = ClipEncoder.from_folder(s.aesthetic_clip, s.device)
            dim = (head_encoder or encoder).dim
            if dim != head.dim:
                raise ConfigError(
                    f"the aesthetic predictor takes {head.dim}-d CLIP ViT-L/14 image embeddings; "
                    f"'{(head_encoder or encoder).name}' gives {dim}-d: set aesthetic_clip to a ViT-L/14 folder"
                )
    except (ConfigError, WeightsFileError) as e:
        print(f"error: {e}")
        return 2
    if not Path(s.manifest).is_file():
        print(f"error: '{s.manifest}' does not exist")
        return 2
    folders = s.images or [None]
    results = [evaluate(Path(s.manifest), f, encoder, head, head_encoder) for f in folders]
    data = {"clip": encoder.name, "aesthetic": str(s.aesthetic or ""), "rows": [r.as_json() for r in results]}
    if s.out:
        Path(s.out).write_text(json.dumps(data, indent=2), encoding="utf-8")
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(table(results))
        for r in results:
            if r.report.skipped:
                print(f"{r.label}: {r.report.summary()}")
        if head is None:
            print("CLIP-AS: n/a (no aesthetic predictor given)")
    return 0 if any(r.scores for r in results) else 1
