"""Model discovery, and install.py's promise: install only what is missing, never touch a pinned package."""

from __future__ import annotations

import runpy
import sys
import types
from pathlib import Path

import pytest

from lib_anydressing.generation.model_files import TRAINING_FREE, list_models, model_dirs, resolve_model

ROOT = Path(__file__).resolve().parent.parent


def test_models_listed_and_resolved(tmp_path, monkeypatch):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    (first / "dress.safetensors").write_bytes(b"1")
    (second / "dress.safetensors").write_bytes(b"2")
    (second / "shirt.safetensors").write_bytes(b"3")
    (second / "notes.txt").write_text("not a model")
    monkeypatch.setenv("ANYDRESSING_MODELS_DIR", str(second))
    dirs = model_dirs([first, tmp_path / "missing"])
    assert dirs[-2:] == [first.resolve(), second.resolve()]
    assert list_models(dirs[-2:]) == {
        "dress": first.resolve() / "dress.safetensors",
        "shirt": second.resolve() / "shirt.safetensors",
    }
    assert resolve_model(TRAINING_FREE, dirs) is None
    assert resolve_model("shirt", dirs) == second.resolve() / "shirt.safetensors"
    with pytest.raises(FileNotFoundError, match="no AnyDressing model 'hat'.*dress, shirt"):
        resolve_model("hat", dirs)


class _Launch(types.ModuleType):
    """The two functions of the WebUI's `launch` module install.py uses, with their real signatures."""

    def __init__(self, installed: set[str]):
        super().__init__("launch")
        self.installed = installed
        self.pip_calls: list[str] = []

    def is_installed(self, package):
        return package in self.installed

    def run_pip(self, command, desc=None, live=False):
        self.pip_calls.append(command)


@pytest.mark.parametrize(
    "installed, expected",
    [
        ({"safetensors", "segment_anything"}, []),
        ({"safetensors"}, ["install segment-anything==1.0"]),
        (set(), ["install safetensors", "install segment-anything==1.0"]),
    ],
)
def test_install_only_installs_what_is_missing(monkeypatch, installed, expected):
    fake = _Launch(installed)
    monkeypatch.setitem(sys.modules, "launch", fake)
    runpy.run_path(str(ROOT / "install.py"))
    assert fake.pip_calls == expected
    assert all("--upgrade" not in c and not c.startswith(("install torch", "install numpy")) for c in fake.pip_calls)


def test_preload_adds_models_dir_flag():
    import argparse

    parser = argparse.ArgumentParser()
    runpy.run_path(str(ROOT / "preload.py"))["preload"](parser)
    assert parser.parse_args(["--anydressing-models-dir", "/x"]).anydressing_models_dir == "/x"
