"""The one resume format of both trainers: a state folder replaced atomically, so a crash mid-save keeps the
previous state whole.

    weights.safetensors     the trainable weights
    state.pt                step, optimizer, loss scaler, LR schedule, torch RNG, settings fingerprint, extras
    generator_rank{r}.pt    each process's own data/noise generator

Everything is read back with `weights_only=True` (plain tensors, numbers, strings, lists, dicts).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

WEIGHTS, STATE = "weights.safetensors", "state.pt"


class TrainingError(Exception):
    """Training cannot start or go on (settings, dataset, a saved state), with a message meant for the user."""


def generator_file(rank: int) -> str:
    return f"generator_rank{rank}.pt"


def staging_folder(folder: Path) -> Path:
    """Where a state is written before it replaces `folder`; emptied first (an interrupted save may have left files)."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_main(tmp: Path, weights: dict[str, Tensor], state: dict[str, Any]) -> None:
    """Process 0's part: the weights and the state dict."""
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / WEIGHTS))
    torch.save(state, tmp / STATE)


def publish(tmp: Path, folder: Path) -> None:
    """Replace `folder` by the complete `tmp`."""
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def read(folder: Path, rank: int) -> tuple[dict[str, Tensor], dict[str, Any], Tensor]:
    """(weights, state, this process's generator state); TrainingError when the folder is not a usable state."""
    try:
        weights = load_file(str(folder / WEIGHTS))
        state = torch.load(folder / STATE, map_location="cpu", weights_only=True)
        generator = torch.load(folder / generator_file(rank), weights_only=True)
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:
        raise TrainingError(f"resume: '{folder}' cannot be loaded ({e}); delete it to start over") from e
    return weights, state, generator


def changed_settings(saved: object, now: dict[str, object]) -> str:
    """'key: X then, Y now' for every setting that differs from the saved run's; '' when it can resume."""
    try:
        before = json.loads(saved)  # type: ignore[arg-type]
    except (TypeError, json.JSONDecodeError):
        before = None
    before = before if isinstance(before, dict) else {}
    now = json.loads(json.dumps(now))  # tuples as lists, as they were saved
    keys = sorted(set(before) | set(now))
    return ", ".join(
        f"{k}: {before.get(k, '?')} then, {now.get(k, '?')} now" for k in keys if before.get(k) != now.get(k)
    )
