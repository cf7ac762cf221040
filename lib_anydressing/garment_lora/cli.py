"""`python -m lib_anydressing train-lora --config cfg.toml`: train a garment LoRA without the WebUI.

The TOML file holds `checkpoint` (an SD1.x single file), optionally `tokenizer` (a folder with
vocab.json and merges.txt; default: what is already on disk), `prediction` ("eps"/"v"), `device`
("auto", "cuda", "cpu"), `preset` ("8 GB", "12 GB", "16+ GB"), and any TrainConfig key
(dataset_dir, output_dir, name, epochs, learning_rate, ...); keys given in the file win over the
preset. Ctrl-C stops after the current step and saves a state that the same command resumes.
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path
from typing import Any

import torch

from ..files.config import ConfigFileError, read_toml
from ..sd.architectures import SDCheckpointError
from ..sd.checkpoint import load_sd_checkpoint
from ..training.loop import Progress, resolve_precision
from ..training.state import TrainingError
from .trainer import PRESETS, TrainConfig, train_lora

MODEL_KEYS = ("checkpoint", "tokenizer", "prediction", "device", "preset")
PATH_KEYS = ("checkpoint", "tokenizer", "dataset_dir", "output_dir", "reg_dir", "resume")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="TOML settings (see the README)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing <name>.safetensors")


def main(args: argparse.Namespace) -> int:
    try:
        settings = read_toml(args.config, path_keys=PATH_KEYS, words=("latest", "no"))
        model_settings = {k: settings.pop(k) for k in MODEL_KEYS if k in settings}
        config = build_config(settings, model_settings.get("preset"), overwrite=args.overwrite)
        if "checkpoint" not in model_settings:
            raise TrainingError('the config needs `checkpoint = "path/to/model.safetensors"`')
        device = _device(model_settings.get("device", "auto"))
        precision = resolve_precision(config.mixed_precision, device)
        dtype = DTYPES[precision] if device.type == "cuda" else torch.float32  # on the CPU: autocast only
        print(f"loading {model_settings['checkpoint']} ({device}, {dtype})")
        model = load_sd_checkpoint(
            model_settings["checkpoint"],
            tokenizer=model_settings.get("tokenizer"),
            prediction=model_settings.get("prediction"),
            dtype=dtype,
            device=device,
        )
        if not config.base_model_name:
            config.base_model_name = Path(model_settings["checkpoint"]).name
    except (TrainingError, ConfigFileError, SDCheckpointError, OSError) as e:
        print(f"error: {e}")
        return 2
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: _first_interrupt(stop, previous))
    try:
        result = train_lora(model, config, on_progress=_print_sample, stop=stop, progress_bar=True)
    except TrainingError as e:
        print(f"error: {e}")
        return 2
    finally:
        signal.signal(signal.SIGINT, previous)
    print()
    for line in result.skipped:
        print(f"skipped {line}")
    for note in result.notes:
        print(f"note: {note}")
    print(result.message)
    return {"done": 0, "interrupted": 130}.get(result.status, 1)


def build_config(settings: dict[str, Any], preset: str | None, *, overwrite: bool = False) -> TrainConfig:
    """A TrainConfig from the preset's values overridden by the file's."""
    if preset is not None and preset not in PRESETS:
        raise TrainingError(f"unknown preset '{preset}': choose one of {', '.join(PRESETS)}")
    values = {**(PRESETS[preset] if preset else {}), **settings}
    missing = [k for k in ("dataset_dir", "output_dir", "name") if k not in values]
    if missing:
        raise TrainingError(f"the config needs {', '.join(missing)}")
    if overwrite:
        values["overwrite"] = True
    return TrainConfig(**values)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError("device 'cuda' was asked for but no CUDA GPU is available")
    return torch.device(name)


def _first_interrupt(stop: threading.Event, previous: Any) -> None:
    print("\nstopping after this step (Ctrl-C again to abort without saving)")
    stop.set()
    signal.signal(signal.SIGINT, previous)


def _print_sample(p: Progress) -> None:
    """The loop's tqdm bar shows steps, loss and ETA; samples are printed above it."""
    if p.sample is not None:
        from tqdm import tqdm

        tqdm.write(f"epoch {p.epoch}: sample {p.sample}")
