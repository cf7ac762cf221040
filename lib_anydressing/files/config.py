"""The TOML settings files of the headless commands (train, train-lora, eval): one reader, one error, one path
rule (a relative path in a file is taken from the file's folder, wherever the command runs)."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any


class ConfigFileError(ValueError):
    """A settings file that cannot be read; the message names the file and the reason."""


def read_toml(path: str | Path, path_keys: Collection[str] = (), words: Collection[str] = ()) -> dict[str, Any]:
    """The file as a dict, the values of `path_keys` (top level or one section deep; a string or a list of
    strings) made absolute from the file's folder, except the `words` that are not paths (resume = "latest").
    Python 3.11+ has tomllib; the WebUI's 3.10 needs the same parser as `tomli`."""
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
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigFileError(f"'{path}' is not valid TOML: {e}") from e
    base = Path(path).resolve().parent
    for table in [data, *(v for v in data.values() if isinstance(v, dict))]:
        for key in set(path_keys) & set(table):
            table[key] = _from_folder(table[key], base, words)
    return data


def _from_folder(value: Any, base: Path, words: Collection[str]) -> Any:
    if isinstance(value, list):
        return [_from_folder(v, base, words) for v in value]
    if not isinstance(value, str) or not value or value in words or Path(value).is_absolute():
        return value
    return str(base / value)
