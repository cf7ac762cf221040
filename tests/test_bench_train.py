"""bench-train: both variants measured in one run, on the SD1.5 topology (narrow here, for speed)."""

from __future__ import annotations

import json

import torch

from lib_anydressing.anydressing_trainer import bench
from lib_anydressing.sd.random_models import sd15_shaped


def test_the_benches_model_has_sd15_shapes():
    sd = sd15_shaped(model_channels=32, vae_channels=32)
    assert sd.unet.model_channels == 32 and sd.text_encoder.config.hidden_size == 768
    assert len([m for m in sd.unet.modules() if hasattr(m, "attn1")]) == 16  # SD1.5's 16 transformer blocks
    assert sd.vae.encoder.num_res_blocks == 2 and sd.encode_text(["a"]).shape == (1, 77, 768)


def test_bench_train_json_reports_both_variants(capsys):
    parser = __import__("argparse").ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(
        ["--json", "--size", "64", "64", "--model-channels", "32", "--vae-channels", "32", "--steps", "1"]
    )
    assert bench.main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["sec_per_step_plain"] > 0 and result["sec_per_step_checkpointing"] > 0
    assert result["size"] == [64, 64] and result["model_channels"] == 32 and result["device"] == "cpu"
    assert ("peak_mem_mb_plain" in result) == torch.cuda.is_available()
