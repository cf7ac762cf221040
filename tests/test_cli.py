"""The README's commands: demo (main job on the built-in default) and bench, run small."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from PIL import Image

from lib_anydressing.__main__ import main
from lib_anydressing.engine import Dresser, DressingProjections, GarmentsNet

SMALL = ["--model-channels", "32", "--steps", "2", "--size", "64", "128", "--garment-size", "64", "64"]


def test_demo_writes_grid_and_restores_model(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", *SMALL, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "UNet restored bit-identically: yes" in printed
    grid = Image.open(out)
    assert grid.height == 128 and grid.width > 2 * 64  # garments | plain | dressed | difference


def test_demo_reports_bad_inputs(tmp_path, capsys):
    assert main(["demo", *SMALL, "--garment", str(tmp_path / "missing.png")]) == 2
    assert "missing.png" in capsys.readouterr().out
    not_a_model = tmp_path / "x.safetensors"
    not_a_model.write_bytes(b"garbage")
    assert main(["demo", *SMALL, "--model", str(not_a_model)]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().out


def test_bench_reports_every_figure(capsys):
    args = ["bench", "--json", "--model-channels", "32", "--repeats", "1", "--latent", "16", "8"]
    assert main([*args, "--garment-latent", "8", "8"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("step_ratio", "peer_step_ratio", "extract_ratio", "training_free_step_ratio"):
        assert isinstance(result[key], float) and result[key] > 0
    assert result["n_garments"] == 2 and result["latent_hw"] == [16, 8] and result["garment_latent_hw"] == [8, 8]
    assert result["device"] == "cpu" and result["dtype"] == "float32"


def test_bench_on_sdxls_topology_sizes_its_features(capsys):
    """SDXL dresses only the 1/2 and 1/4 grids: an 8x8 garment latent gives 10 layers of 4x4 tokens 64 wide
    and 60 of 2x2 tokens 128 wide at --model-channels 32, for each of 2 garments, 4 bytes each."""
    args = ["bench", "--arch", "sdxl", "--json", "--model-channels", "32", "--repeats", "1", "--latent", "16", "8"]
    assert main([*args, "--garment-latent", "8", "8"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["arch"] == "sdxl" and result["step_ratio"] > 0 and result["extract_ratio"] > 0
    assert result["features_mb"] == round(2 * 4 * (10 * 16 * 64 + 60 * 4 * 128) / 2**20, 2)


@pytest.mark.slow  # two UNets, a VAE and several sampling loops
def test_whole_bench_dresses_with_the_webui_defaults(capsys):
    args = ["bench", "--whole", "--json", "--model-channels", "32", "--vae-channels", "32", "--repeats", "1"]
    assert main([*args, "--latent", "16", "8", "--steps", "2", "--n-garments", "1", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["resolution"], result["detail"], result["fine_pool"], result["image_wh"]) == (0, 1.0, 2, [64, 128])
    one, two = result["garments"]
    # the token budget: one garment may cover the 64x128 image; two get 64x64 each (64x128 would be over)
    assert (one["garment_canvas"], two["garment_canvas"]) == ([64, 128], [64, 64])
    # SD1.5 attends at latent size: 16x8 and 2 x 8x8 tokens, pooled 2x2
    assert (one["garment_tokens_finest"], two["garment_tokens_finest"]) == (32, 32)
    for row in result["garments"]:
        assert all(
            isinstance(row[k], float) and row[k] > 0 for k in ("whole_ratio_warm", "whole_ratio_cold", "step_ratio")
        )


def test_garment_kv_computed_once_per_generation(unet, inputs, garments):
    """K'/V' depend only on the garments: projected at install, never per step (peers do it per step)."""
    proj = DressingProjections.from_unet(unet).requires_grad_(False)
    calls = []
    for module in proj.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda *a: calls.append(1))
    feats = GarmentsNet(unet, shared=True).extract(garments)
    n_layers = len(feats.per_layer)
    for recompute, per_step in ((False, 0), (True, 2 * n_layers)):
        calls.clear()
        with torch.no_grad(), Dresser(unet, feats, proj, recompute_kv=recompute):
            installed = len(calls)
            for _ in range(3):
                unet(*inputs[:2], context=inputs[2])
        assert installed == (0 if recompute else 2 * n_layers)
        assert len(calls) - installed == 3 * per_step


def test_demo_with_magicclothing_style_garment_guidance(tmp_path, capsys):
    assert main(["demo", *SMALL, "--garment-guidance", "2.5", "--out", str(tmp_path / "d.png")]) == 0
    assert "UNet restored bit-identically: yes" in capsys.readouterr().out


def test_guidance_formulas():
    from lib_anydressing.sd.sampling import combine_guidance, guidance_layout

    text, garments, uncond = torch.tensor([3.0]), torch.tensor([2.0]), torch.tensor([0.5])
    # docs/method.md CFG (eq. 16) and MagicClothing's OmsDiffusionPipeline, written out here
    assert combine_guidance(torch.cat([text, uncond]), 6.0) == 6.0 * 3.0 + (1 - 6.0) * 0.5
    assert combine_guidance(torch.cat([text, garments, uncond]), 5.0, 2.5) == 0.5 + 5.0 * (3 - 2) + 2.5 * (2 - 0.5)
    assert guidance_layout(2, None) == (2, [0, 1])
    assert guidance_layout(2, 2.5) == (3, [0, 1, 2, 3])


def test_cli_imports_from_the_webuis_repositories(tmp_path, monkeypatch):
    """A1111 adds repositories/stable-diffusion-stability-ai (ldm) to sys.path only when it starts."""
    from lib_anydressing.__main__ import webui_repositories

    webui = tmp_path / "webui"
    for name in ("stable-diffusion-stability-ai", "k-diffusion"):
        (webui / "repositories" / name).mkdir(parents=True)
    package = webui / "extensions" / "sd-webui-anydressing" / "lib_anydressing"
    package.mkdir(parents=True)
    want = [webui / "repositories" / "stable-diffusion-stability-ai", webui / "repositories" / "k-diffusion"]
    assert webui_repositories(package) == want
    assert webui_repositories(tmp_path / "elsewhere" / "x" / "lib_anydressing") == []
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("ANYDRESSING_WEBUI", str(webui))
    main(["selftest", "--url", "http://127.0.0.1:9", "--timeout", "2"])  # nothing listens: exits at once
    assert [p for p in sys.path if p.startswith(str(webui))] == [str(p) for p in want]


def test_cli_without_ldm_says_what_to_install(monkeypatch, capsys):
    for name in ["ldm", *(n for n in sys.modules if n.startswith("ldm."))]:  # earlier tests imported them
        monkeypatch.setitem(sys.modules, name, None)
    assert main(["demo", *SMALL]) == 1
    said = capsys.readouterr().err
    assert "ANYDRESSING_WEBUI" in said and "stable-diffusion-sdkit" in said


def test_bench_attention_is_ldms_attention_through_sdpa(unet, inputs):
    """The benches time the attention the WebUIs run (SDPA), which must compute what ldm's does."""
    from lib_anydressing.sd.attention import sdp_attention

    x, t, ctx = inputs
    with torch.no_grad():
        plain = unet(x, t, context=ctx)
        patches = sdp_attention(unet)
        sdp = unet(x, t, context=ctx)
        for patch in patches:
            patch.restore()
        after = unet(x, t, context=ctx)
    torch.testing.assert_close(sdp, plain, atol=1e-4, rtol=1e-4)
    assert torch.equal(after, plain) and not any("forward" in m.__dict__ for m in unet.modules())
