"""SDXL single-file checkpoints read headless: a tiny SDXL-layout file written here (ldm UNet at SDXL's topology,
transformers CLIP-L, and OpenCLIP's own TextTransformer for bigG, from the open_clip package A1111 pins) loads
into modules that compute what the originals compute; the conditioning matches OpenCLIP's outputs and sgm's
size embedding; dress-batch renders from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lib_anydressing.__main__ import main as cli
from lib_anydressing.sd.architectures import SDXL_UNET, TINY_VAE, SDCheckpointError, build_autoencoder
from lib_anydressing.sd.checkpoint import load_sd_checkpoint
from lib_anydressing.sd.random_models import build_unet, reinitialise
from lib_anydressing.sd.tokenizer import tiny_clip_tokenizer

open_clip = pytest.importorskip("open_clip")

L_WIDTH, G_WIDTH, PROJECTION, SIZE_WIDTH = 32, 64, 16, 8  # bigG: 1280 wide, projection 1280; sizes: 256 per number
UNET = {
    **SDXL_UNET,
    "model_channels": 64,
    "context_dim": L_WIDTH + G_WIDTH,
    "adm_in_channels": PROJECTION + 6 * SIZE_WIDTH,
}


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory):
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_clip_tokenizer()
    unet = build_unet(UNET, seed=1)
    vae = build_autoencoder(TINY_VAE, embed_dim=4)
    reinitialise(vae, seed=2)
    sizes = {"hidden_size": L_WIDTH, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 1}
    clip_l = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_act="quick_gelu", **sizes))
    reinitialise(clip_l, seed=3)
    clip_g = open_clip.transformer.TextTransformer(vocab_size=len(tokenizer), width=G_WIDTH, heads=1, layers=3,
                                                   output_dim=PROJECTION)  # fmt: skip
    reinitialise(clip_g, seed=4)
    state = {
        **{f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()},
        **{f"first_stage_model.{k}": v for k, v in vae.state_dict().items()},
        **{f"conditioner.embedders.0.transformer.{k}": v for k, v in clip_l.state_dict().items()},
        **{f"conditioner.embedders.1.model.{k}": v for k, v in clip_g.state_dict().items()},
        "conditioner.embedders.1.model.logit_scale": torch.tensor(4.6),  # in real files; not part of the text tower
    }
    path = tmp_path_factory.mktemp("sdxl") / "tinyxl.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    tokenizer.save_pretrained(str(path.parent / "tokenizer"))
    return path, {"unet": unet, "vae": vae, "clip_l": clip_l, "clip_g": clip_g, "tokenizer": tokenizer}


def test_the_unet_and_vae_compute_as_the_originals(sdxl_file):
    path, original = sdxl_file
    model = load_sd_checkpoint(path, tokenizer=original["tokenizer"])
    assert model.is_sdxl and model.latent_scale == 0.13025
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10.0, 700.0])
    context, y = torch.randn(2, 77, L_WIDTH + G_WIDTH), torch.randn(2, UNET["adm_in_channels"])
    with torch.no_grad():
        assert torch.equal(model.unet(x, t, context=context, y=y), original["unet"](x, t, context=context, y=y))
        pixels = torch.rand(1, 3, 32, 32) * 2 - 1
        assert torch.equal(model.vae.encode(pixels).mean, original["vae"].encode(pixels).mean)


def _open_clip_ids(tokenizer, prompts):
    """open_clip.tokenize's layout over this vocabulary: start, the tokens, end, then zeros to 77."""
    rows = []
    for prompt in prompts:
        ids = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
        rows.append(ids + [0] * (77 - len(ids)))
    return torch.tensor(rows)


def test_conditioning_matches_open_clip_and_sgm(sdxl_file):
    from ldm.modules.diffusionmodules.util import timestep_embedding

    path, original = sdxl_file
    model = load_sd_checkpoint(path, tokenizer=original["tokenizer"])
    prompts = ["red shirt", ""]
    with torch.no_grad():
        out = model.unet_conditioning(prompts, (96, 64))
        ids = _open_clip_ids(original["tokenizer"], prompts)
        g = original["clip_g"]
        x = (g.token_embedding(ids) + g.positional_embedding).permute(1, 0, 2)
        for block in g.transformer.resblocks[:-1]:  # sgm's "penultimate": every block but the last, no ln_final
            x = block(x, attn_mask=g.attn_mask)
        penultimate_g = x.permute(1, 0, 2)
        pooled_g = g(ids)  # open_clip's own pooled output: ln_final at the end token, through the projection
        ids_l = original["tokenizer"](prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
        hidden_l = original["clip_l"](ids_l, output_hidden_states=True).hidden_states[-2]  # padded with the end token
    assert out["context"].shape == (2, 77, L_WIDTH + G_WIDTH)
    torch.testing.assert_close(out["context"][..., :L_WIDTH], hidden_l, rtol=0, atol=1e-6)
    torch.testing.assert_close(out["context"][..., L_WIDTH:], penultimate_g, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["y"][:, :PROJECTION], pooled_g, rtol=1e-5, atol=1e-5)
    sizes = [timestep_embedding(torch.tensor(pair), SIZE_WIDTH).flatten() for pair in ([96, 64], [0, 0], [96, 64])]
    assert torch.equal(out["y"][0, PROJECTION:], torch.cat(sizes))  # sgm's ConcatTimestepEmbedderND, h then w
    zero = model.conditioner(prompts, (96, 64), zero_text=True)
    assert not zero["context"].any() and not zero["y"][:, :PROJECTION].any()
    assert torch.equal(zero["y"][:, PROJECTION:], out["y"][:, PROJECTION:])


def test_an_incomplete_sdxl_file_is_named(sdxl_file, tmp_path):
    from safetensors.torch import load_file

    path, original = sdxl_file
    state = load_file(str(path))
    del state["conditioner.embedders.1.model.text_projection"]
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(SDCheckpointError, match="broken.safetensors.*text_projection.*not a complete SDXL"):
        load_sd_checkpoint(tmp_path / "broken.safetensors", tokenizer=original["tokenizer"])


def test_dress_batch_renders_an_sdxl_file(sdxl_file, tmp_path):
    path, _ = sdxl_file
    garment = str(Path(__file__).parent / "data" / "garment_top.png")
    job = {"id": "xl", "prompt": "red shirt", "garments": [{"image": garment, "category": "upper"}], "seeds": [1, 2],
           "width": 128, "height": 128, "steps": 2}  # fmt: skip
    (tmp_path / "jobs.jsonl").write_text(json.dumps(job) + "\n")
    files = ["--manifest", str(tmp_path / "jobs.jsonl"), "--out", str(tmp_path / "out"), "--checkpoint", str(path)]
    code = cli(["dress-batch", *files, "--tokenizer", str(path.parent / "tokenizer"), "--device", "cpu"])
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert code == 0 and [r["status"] for r in records] == ["ok", "ok"], records
    assert (tmp_path / "out" / "xl-1.png").read_bytes() != (tmp_path / "out" / "xl-2.png").read_bytes()


@pytest.mark.parametrize("text_encoder", [False, True])
def test_train_lora_headless_on_an_sdxl_file(sdxl_file, tmp_path, capsys, text_encoder):
    """train-lora reads the SDXL file itself: a UNet LoRA under kohya's SDXL names (the run under 1024 px noted),
    and with train_text_encoder both encoders' LoRAs, lora_te1_ (CLIP-L) and lora_te2_ (bigG), trained."""
    import argparse

    import numpy as np
    from PIL import Image
    from safetensors import safe_open

    from lib_anydressing.garment_lora import cli as train_lora

    path, original = sdxl_file
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("red shirt")
    config = {"checkpoint": str(path), "tokenizer": str(path.parent / "tokenizer"), "device": "cpu",
              "dataset_dir": str(data), "output_dir": str(tmp_path / "out"), "name": "xl_shirt", "resolution": 64,
              "rank": 2, "epochs": 2, "train_text_encoder": text_encoder, "text_encoder_lr": 1e-2}  # fmt: skip
    (tmp_path / "cfg.toml").write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in config.items()))
    parser = argparse.ArgumentParser()
    train_lora.add_arguments(parser)
    assert train_lora.main(parser.parse_args(["--config", str(tmp_path / "cfg.toml")])) == 0
    assert "1024" in capsys.readouterr().out  # SDXL trained below its resolution: said, not refused
    with safe_open(str(tmp_path / "out" / "xl_shirt.safetensors"), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118
    bases = {k.partition(".")[0] for k in tensors}
    assert any(b.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") for b in bases)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["ss_network_train_unet_only"] == str(not text_encoder)
    text = {b for b in bases if b.startswith("lora_te")}
    if not text_encoder:
        assert not text
        return
    layers = {"lora_te1_": original["clip_l"].config.num_hidden_layers, "lora_te2_": 3}
    for prefix, n in layers.items():  # 6 Linears per layer: q, k, v, out, fc1, fc2
        assert len({b for b in text if b.startswith(prefix)}) == 6 * n
    trained = [tensors[f"{b}.lora_up.weight"].abs().max() for b in text if b.startswith("lora_te2_")]
    assert max(trained) > 0  # bigG's LoRA learnt through the conditioning (lora_up starts at zero)
