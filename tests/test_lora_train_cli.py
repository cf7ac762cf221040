"""`train-lora --config cfg.toml`: a checkpoint file and a dataset folder in, a kohya LoRA out; bad configs named."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from support.checkpoints import write_tiny_checkpoint

from lib_anydressing.garment_lora import cli


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    write_tiny_checkpoint(root)
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(data / f"{i}.jpg")
        (data / f"{i}.txt").write_text("red shirt")
    Image.new("CMYK", (64, 64), (0, 200, 200, 0)).save(data / "cmyk.jpg")  # a printer's red: converted, used
    Image.new("RGB", (1, 1)).save(data / "dot.png")
    (data / "broken.png").write_bytes(b"not an image")
    (data / "broken.txt").write_text("x")
    return root


def _run(root, text: str, *extra: str) -> int:
    (root / "cfg.toml").write_text(text)
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.main(parser.parse_args(["--config", str(root / "cfg.toml"), *extra]))


def _toml(root, **extra) -> str:
    values = {
        "checkpoint": str(root / "tiny.safetensors"),
        "tokenizer": str(root / "tokenizer"),
        "device": "cpu",
        "dataset_dir": str(root / "data"),
        "output_dir": str(root / "out"),
        "name": "red_shirt",
        "resolution": 64,
        "rank": 2,
        "alpha": 1.0,
        "epochs": 2,
        **extra,
    }
    return "\n".join(f"{k} = {_value(v)}" for k, v in values.items())


def _value(v) -> str:
    return f'"{v}"' if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)


def test_trains_from_a_toml_file_and_refuses_to_overwrite(files, capsys):
    text = _toml(files, preset="8 GB", mixed_precision="bf16", gradient_checkpointing=False)
    assert _run(files, text) == 0
    out = capsys.readouterr().out
    assert "skipped broken.png" in out and "skipped dot.png: 1x1 is too small" in out
    assert "saved red_shirt.safetensors after 6 steps" in out  # 3 usable images x 2 epochs
    tensors = load_file(str(files / "out" / "red_shirt.safetensors"))
    assert tensors and all(torch.isfinite(v).all() for v in tensors.values())
    assert _run(files, text) == 2 and "exists" in capsys.readouterr().out
    assert _run(files, text, "--overwrite") == 0


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t + "\nlearning_rat = 1e-4", "learning_rat: unknown setting"),
        (lambda t: t + '\npreset = "4 GB"', "unknown preset '4 GB'"),
        (lambda t: t.replace("name =", "nam ="), "needs name"),
        (lambda t: t.replace("checkpoint =", "# checkpoint ="), "needs `checkpoint"),
        (lambda t: t + '\nmixed_precision = "fp16"', "fp16 mixed precision needs a CUDA GPU"),
        (lambda t: t + "\nrank = [", "not valid TOML"),
        (lambda t: t.replace('name = "red_shirt"', 'name = "../escape"'), "not a usable LoRA name"),
        (lambda t: t.replace("tiny.safetensors", "absent.safetensors"), "does not exist"),
    ],
)
def test_bad_configs_are_named(files, capsys, edit, message):
    assert _run(files, edit(_toml(files, output_dir=str(files / "other")))) == 2
    assert message in capsys.readouterr().out
    assert not (files.parent / "escape.safetensors").exists()


def test_bench_lora_times_plain_and_memory_savers_in_one_run(capsys):
    from lib_anydressing.__main__ import main

    assert main(["bench-lora", "--json", "--model-channels", "32", "--resolution", "64", "--steps", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    plain, savers = result["sec_per_step_plain"], result["sec_per_step_savers"]
    assert plain > 0 and savers > 0
    assert result["step_ratio"] == pytest.approx(savers / plain, abs=2e-3)
    assert result["resolution"] == 64 and result["model_channels"] == 32 and result["batch_size"] == 1


def test_bench_lora_compares_a_lycoris_network_with_plain_lora_in_the_same_run(capsys):
    from lib_anydressing.__main__ import main

    args = ["bench-lora", "--json", "--model-channels", "32", "--resolution", "64", "--steps", "1"]
    assert main([*args, "--network", "loha"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["network"] == "loha" and result["sec_per_step_lora"] > 0
    assert result["network_ratio"] == pytest.approx(
        result["sec_per_step_plain"] / result["sec_per_step_lora"], abs=2e-3
    )


@pytest.mark.slow
def test_bench_lora_on_sdxl_topology_trains_with_the_pooled_inputs(capsys):
    from lib_anydressing.__main__ import main

    args = ["bench-lora", "--json", "--arch", "sdxl", "--model-channels", "32", "--resolution", "64", "--steps", "1"]
    assert main([*args, "--rank", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["arch"] == "sdxl" and result["resolution"] == 64
    assert result["sec_per_step_plain"] > 0 and result["sec_per_step_savers"] > 0
