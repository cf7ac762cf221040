"""Where AnyDressing model files live, and how a name picked in a list becomes a path."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

EXTENSION_MODELS = Path(__file__).resolve().parents[2] / "models" / "anydressing"
TRAINING_FREE = "training-free (no weights)"
TRAINING_FREE_NAMES = (TRAINING_FREE, "training-free", "")  # what API callers and pasted infotexts may write
ENV_DIR = "ANYDRESSING_MODELS_DIR"
PEER_FILES = {"garment_extractor.safetensors"}  # MagicClothing's raw extractor: converted, not listed


def model_dirs(extra: Iterable[str | Path | None] = ()) -> list[Path]:
    """The extension's models/anydressing, then `extra` (the WebUI's models dir, --anydressing-models-dir),
    then $ANYDRESSING_MODELS_DIR; duplicates and missing folders left out."""
    candidates = [EXTENSION_MODELS, *extra, os.environ.get(ENV_DIR)]
    dirs: list[Path] = []
    for c in candidates:
        if c and Path(c).is_dir() and Path(c).resolve() not in dirs:
            dirs.append(Path(c).resolve())
    return dirs


def list_models(dirs: Iterable[Path]) -> dict[str, Path]:
    """name -> path of every *.safetensors in `dirs`; the first folder wins a name clash."""
    found: dict[str, Path] = {}
    for d in dirs:
        for path in sorted(d.glob("*.safetensors")):
            if path.name not in PEER_FILES:
                found.setdefault(path.stem, path)
    return found


def resolve_model(name: str, dirs: Iterable[Path]) -> Path | None:
    """None for the training-free default; else the file named `name` (a path, or a listed name)."""
    if name in TRAINING_FREE_NAMES:
        return None
    if Path(name).suffix == ".safetensors" and Path(name).exists():
        return Path(name)
    models = list_models(dirs)
    if name not in models:
        known = ", ".join(sorted(models)) or "none"
        raise FileNotFoundError(f"no AnyDressing model '{name}' (found: {known}; put files in models/anydressing)")
    return models[name]


def short_hash(path: Path) -> str:
    """8 hex digits of sha256 over 64 KiB at offset 1 MiB: the WebUI's quick model hash, instant on any size."""
    import hashlib

    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def describe_model(name: str, dirs: Iterable[Path]) -> tuple[float | None, str]:
    """(default strength, one line on origin and license) for the model dropdown; never raises."""
    from ..engine.checkpoint import AnyDressingModel, CheckpointError, read_info

    try:
        path = resolve_model(name, dirs)
        info = AnyDressingModel.training_free().info if path is None else read_info(path)
    except (FileNotFoundError, CheckpointError) as e:
        return None, f"⚠ {e}"
    text = f"Model: {info.origin}"
    if info.license:
        text += f". License: {info.license}"
    return info.default_strength, text
