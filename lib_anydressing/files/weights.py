"""Reading weight files made elsewhere without ever executing a pickle."""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor


class WeightsFileError(ValueError):
    """A weights file that cannot be read, with a message meant for the user."""


def load_tensors(
    path: str | Path, *, error: type[WeightsFileError] = WeightsFileError, wrappers: tuple[str, ...] = ()
) -> dict[str, Tensor]:
    """A flat name -> tensor dict from a .safetensors file or a pickled torch file (.pth/.pt/.bin).

    Pickles are read with `weights_only=True` only: one holding anything but tensors and plain
    containers (code, optimizer objects) is refused, never run. A dict nested under one of
    `wrappers` (DeepSpeed's "module", "state_dict", SAM's "model") is unwrapped. Problems raise
    `error`, so each caller keeps its own error type.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"'{path}' does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise error(f"'{path.name}' is not a readable safetensors file: {e}") from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise error(
            f"'{path.name}' holds Python objects other than tensors; it was refused and not loaded "
            f"(only weights_only pickles are read): {str(e).splitlines()[0]}"
        ) from e
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise error(f"'{path.name}' is truncated or not a torch weights file: {e}") from e
    for wrapper in wrappers:
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise error(f"'{path.name}' is not a flat dictionary of tensors")
    return dict(obj)


class TensorReader:
    """A weights file's tensors read one at a time: a .safetensors file is mapped, not loaded, so a model of
    several GB can be filled without a second copy in memory; a plain dict (a loaded pickle) works the same."""

    def __init__(self, tensors: dict[str, Tensor] | None = None, *, safetensors_path: Path | None = None) -> None:
        self._dict = tensors
        self._file = safe_open(str(safetensors_path), "pt") if safetensors_path is not None else None

    def keys(self) -> list[str]:
        return list(self._dict) if self._dict is not None else list(self._file.keys())

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        if self._dict is not None:
            return tuple(self._dict[key].shape)
        return tuple(self._file.get_slice(key).get_shape())

    def get(self, key: str) -> Tensor:
        return self._dict[key] if self._dict is not None else self._file.get_tensor(key)


def open_tensors(
    path: str | Path, *, error: type[WeightsFileError] = WeightsFileError, wrappers: tuple[str, ...] = ()
) -> TensorReader:
    """`load_tensors`, read lazily where the format allows (.safetensors); the same checks and messages."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return TensorReader(load_tensors(path, error=error, wrappers=wrappers))
    try:
        return TensorReader(safetensors_path=path)
    except (SafetensorError, OSError) as e:
        raise error(f"'{path.name}' is not a readable safetensors file: {e}") from e
