"""`python -m lib_anydressing train --config cfg.toml`: train an AnyDressing model (GarmentsNet + GFE LoRAs +
Dressing-Attention) from an SD1.x checkpoint on a dressing dataset; see README "Training AnyDressing".

Writes under the config's output_dir: models/anydressing_stepXXXXXXX.safetensors (the extension's
format: copy one into models/anydressing/ and the WebUI lists it), state/ (resume with resume = "latest"),
loss_log.csv (every loss term per step) and samples/ (grids, when sample_every > 0).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..files.weights import WeightsFileError
from .config import ConfigError, TrainConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="TOML file (see README for the keys)")
    parser.add_argument("--steps", type=int, default=None, help="override the config's steps")
    parser.add_argument("--resume", default=None, help="'latest' or a state folder (overrides the config)")


def main(args: argparse.Namespace) -> int:
    from ..training.state import TrainingError
    from .trainer import train_from_config

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        cfg = TrainConfig.from_toml(args.config)
        if args.steps is not None:
            cfg.steps = args.steps
        if args.resume is not None:
            cfg.resume = args.resume
        cfg.check()
        step = train_from_config(cfg)
    except (ConfigError, TrainingError, WeightsFileError, ValueError, OSError) as e:
        print(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last saved state is in the output folder's state/ (resume = 'latest')")
        return 130
    print(f"done: step {step}, outputs in {cfg.output_dir}")
    return 0
