"""The TOML settings files of the headless commands (train, train-lora, eval): one reader, one error."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class ConfigFileError(ValueError):
    """A settings file that cannot be read; the message names the file and the reason."""


def read_toml(path: str | Path) -> dict[str, Any]:
    """The file as a dict. Python 3.11+ has tomllib; the WebUI's 3.10 needs the same parser as `tomli`."""
    try:
        import tomllib
    except ModuleNotFoundError:
        try:
            import tomli as tomllib
        except ModuleNotFoundError as e:
            raise ConfigFileError("reading TOML on Python 3.10 needs `pip install tomli` (3.11+ has it)") from e
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigFileError(f"cannot read '{path}': {e}") from e
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigFileError(f"'{path}' is not valid TOML: {e}") from e
