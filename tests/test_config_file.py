"""One TOML reader for train, train-lora and eval, with one path rule: relative to the file's folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from lib_anydressing.anydressing_trainer.config import TrainConfig
from lib_anydressing.files.config import ConfigFileError, read_toml


def test_relative_paths_are_taken_from_the_files_folder_whatever_the_working_folder(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "run.toml").write_text(
        'checkpoint = "../models/sd.safetensors"\nresume = "latest"\nname = "a/b"\n'
        f'[data]\nimages = ["gen/a", "{tmp_path / "abs"}"]\n',
        encoding="utf-8",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    data = read_toml(Path("../configs/run.toml"), path_keys=("checkpoint", "resume", "images"), words=("latest",))
    assert Path(data["checkpoint"]) == folder / "../models/sd.safetensors"
    assert data["data"]["images"] == [str(folder / "gen/a"), str(tmp_path / "abs")]
    assert data["resume"] == "latest" and data["name"] == "a/b"  # a word, and a key that is not a path


def test_the_anydressing_trainer_config_follows_the_same_rule(tmp_path):
    (tmp_path / "t.toml").write_text('[data]\nmanifest = "data/m.jsonl"\n[train]\nresume = "no"\n', encoding="utf-8")
    cfg = TrainConfig.from_toml(tmp_path / "t.toml")
    assert Path(cfg.manifest) == tmp_path / "data/m.jsonl" and cfg.resume == "no"


def test_a_broken_file_names_itself(tmp_path):
    (tmp_path / "bad.toml").write_text("a = [", encoding="utf-8")
    with pytest.raises(ConfigFileError, match="bad.toml"):
        read_toml(tmp_path / "bad.toml")
