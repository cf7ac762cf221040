"""The converters' view of third-party files: the shared safe loader, raising ConversionError."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from ..files.weights import WeightsFileError
from ..files.weights import load_tensors as _load


class ConversionError(WeightsFileError):
    """A file that cannot be converted, with a message meant for the user."""


def load_tensors(path: str | Path) -> dict[str, Tensor]:
    return _load(path, error=ConversionError, wrappers=("module", "state_dict"))
