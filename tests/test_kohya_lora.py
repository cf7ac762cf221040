"""The garment LoRA's file: kohya keys that the WebUI's Lora extension maps onto real modules, exact patching,
the hashes the WebUI computes."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
import torch.nn.functional as F

from lib_anydressing.garment_lora.kohya_lora import KohyaLoRA
from lib_anydressing.sd.architectures import SD15_UNET
from lib_anydressing.sd.random_models import build_unet, tiny_stable_diffusion

SMALL = {"model_channels": 32, "num_res_blocks": 2}  # SD1.5 block layout, narrow


# A1111 1.10's suffix_conversion: resnet module names, diffusers -> ldm
RESNET_SUFFIXES = {
    "conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
    "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection",
}  # fmt: skip


def a1111_compvis_name(key: str) -> str | None:
    """The UNet rules of A1111 1.10's extensions-builtin/Lora/networks.py convert_diffusers_name_to_compvis
    (commit 82a973c0), restated: diffusers block numbers to ldm ones, resnet suffixes converted, attention
    suffixes kept, the samplers' convolutions."""
    if m := re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        b, kind, a, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = RESNET_SUFFIXES.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_input_blocks_{1 + b * 3 + a}_{1 if kind == 'attentions' else 0}_{rest}"
    if m := re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key):
        rest = RESNET_SUFFIXES.get(m[3], m[3]) if m[1] == "resnets" else m[3]
        return f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{rest}"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        b, kind, a, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = RESNET_SUFFIXES.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_output_blocks_{b * 3 + a}_{1 if kind == 'attentions' else 0}_{rest}"
    if m := re.match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", key):
        return f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", key):
        return f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv"
    if m := re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key):  # SD1 (not SD2) branch
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    return None


def a1111_module_names(unet, text_encoder) -> dict[str, torch.nn.Module]:
    """A1111's assign_network_names_to_compvis_modules for SD1: module names of cond_stage_model.wrapped
    (FrozenCLIPEmbedder, whose CLIPTextModel is `.transformer`) and of sd_model.model (the UNet is
    `.diffusion_model`), dots replaced by underscores."""
    names = {("diffusion_model." + n).replace(".", "_"): m for n, m in unet.named_modules()}
    names.update({("transformer." + n).replace(".", "_"): m for n, m in text_encoder.named_modules()})
    return names


def _nonzero(lora: KohyaLoRA, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.layers.values():
            layer.lora_up.weight.copy_(torch.randn(layer.lora_up.weight.shape, generator=gen) * 0.05)


def test_every_key_maps_onto_the_module_it_trains(tmp_path):
    sd = tiny_stable_diffusion()
    unet = build_unet(SD15_UNET, **SMALL, context_dim=64)
    lora = KohyaLoRA(unet, rank=4, alpha=2, text_encoder=sd.text_encoder)
    path = tmp_path / "garment.safetensors"
    lora.save(path)
    from safetensors.torch import load_file

    keys = load_file(str(path)).keys()
    mapping = a1111_module_names(unet, sd.text_encoder)
    bases = {k.partition(".")[0] for k in keys}  # A1111 splits a key at its first dot
    unet_keys = {b for b in bases if b.startswith("lora_unet_")}
    te_keys = {b for b in bases if b.startswith("lora_te_")}
    assert len(unet_keys) == 192  # as kohya reports for SD1.5: 16 x (2 proj + 8 attn + 2 ff)
    assert len(te_keys) == 2 * 6  # per layer: q, k, v, out_proj, fc1, fc2 (72 for CLIP ViT-L's 12 layers)
    assert unet_keys | te_keys == bases == set(lora.targets)
    for base in bases:
        compvis = a1111_compvis_name(base)
        assert compvis in mapping, f"{base} -> {compvis}: the WebUI would report 'failed to match keys'"
        assert mapping[compvis] is lora.targets[base]
        assert isinstance(mapping[compvis], torch.nn.Linear | torch.nn.Conv2d)
    assert {f"{b}.{p}" for b in bases for p in ("lora_down.weight", "lora_up.weight", "alpha")} == set(keys)


def test_saved_hashes_are_the_ones_the_webui_computes(tmp_path):
    """The WebUI hashes a LoRA as sha256 of the file after its header (the "addnet" hash)."""
    unet = build_unet(SD15_UNET, **SMALL)
    lora = KohyaLoRA(unet, rank=4, alpha=2)
    _nonzero(lora)
    lora.save(tmp_path / "g.safetensors", metadata={"ss_output_name": "g"})
    data = (tmp_path / "g.safetensors").read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "g.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["sshs_model_hash"] == hashlib.sha256(data[header:]).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{8}", meta["sshs_legacy_hash"])
    assert meta["ss_network_train_unet_only"] == "True"


def test_patch_is_exact_and_comes_off(tmp_path):
    unet = build_unet(SD15_UNET, **SMALL)
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([400.0]), torch.randn(1, 7, 768)
    with torch.no_grad():
        plain = unet(x, t, context=ctx)
        lora = KohyaLoRA(unet, rank=4, alpha=4).install()
        assert torch.equal(unet(x, t, context=ctx), plain)  # lora_up starts at zero
        _nonzero(lora)
        dressed = unet(x, t, context=ctx)
        lora.remove()
        assert torch.equal(unet(x, t, context=ctx), plain)
    assert (dressed - plain).abs().max() > 1e-4
    assert not any("forward" in m.__dict__ for m in unet.modules())


def test_saved_file_reloads_with_its_scale(tmp_path):
    unet = build_unet(SD15_UNET, **SMALL)
    trained = KohyaLoRA(unet, rank=4, alpha=2)
    _nonzero(trained, seed=3)
    trained.save(tmp_path / "g.safetensors", metadata={"ss_output_name": "g"})
    loaded = KohyaLoRA(unet, rank=4, alpha=99)
    meta = loaded.load_kohya(tmp_path / "g.safetensors")
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2" and meta["ss_output_name"] == "g"
    key = next(iter(trained.targets))
    module, layer = trained.targets[key], loaded.layers[key]
    x = torch.randn(3, module.in_features if isinstance(module, torch.nn.Linear) else 1)
    if isinstance(module, torch.nn.Linear):
        want = (x @ layer.lora_down.weight.T.float() @ layer.lora_up.weight.T.float()) * 2 / 4  # alpha / dim
        torch.testing.assert_close(layer.delta(x, 1.0), want, atol=1e-3, rtol=1e-3)  # saved in fp16
        torch.testing.assert_close(layer.delta(x, 0.5), want * 0.5, atol=1e-3, rtol=1e-3)


def test_the_scale_follows_the_loaded_alpha(tmp_path):
    """The scale is a float kept beside the alpha buffer: loading a file (or a resumed run's state_dict)
    with another alpha must change the applied delta to up(down(x)) * alpha / rank, and save that alpha."""
    from safetensors.torch import load_file, save_file

    unet = build_unet(SD15_UNET, **SMALL)
    trained = KohyaLoRA(unet, rank=4, alpha=2)
    _nonzero(trained, seed=5)
    trained.save(tmp_path / "a2.safetensors")
    tensors = load_file(str(tmp_path / "a2.safetensors"))
    save_file({k: torch.tensor(6.0) if k.endswith(".alpha") else v for k, v in tensors.items()}, tmp_path / "a6.st")
    key, module = next((k, m) for k, m in trained.targets.items() if isinstance(m, torch.nn.Linear))
    x = torch.randn(3, module.in_features)
    with torch.no_grad():
        base = module(x)
        loaded = KohyaLoRA(unet, rank=4, alpha=2).install()
        layer = loaded.layers[key]
        for name, alpha in (("a2.safetensors", 2), ("a6.st", 6), ("a2.safetensors", 2)):
            loaded.load_kohya(tmp_path / name)
            want = x @ layer.lora_down.weight.T.float() @ layer.lora_up.weight.T.float() * alpha / 4
            torch.testing.assert_close(module(x) - base, want, atol=1e-5, rtol=1e-4)
        loaded.load_kohya(tmp_path / "a6.st")
        resumed = KohyaLoRA(unet, rank=4, alpha=2)
        resumed.load_state_dict(loaded.state_dict())
        torch.testing.assert_close(resumed.layers[key].delta(x, 0.5), layer.delta(x, 0.5))
        assert (layer.delta(x, 1.0) - want * 3).abs().max() < 1e-5  # 6 / 4, not 2 / 4
        loaded.remove()
    loaded.save(tmp_path / "again.safetensors")
    saved = load_file(str(tmp_path / "again.safetensors"))
    assert all(v.item() == 6.0 for k, v in saved.items() if k.endswith(".alpha"))


# LyCORIS network types through the lycoris-lora package: the tensors each key holds in the file
LYCORIS_TENSORS = {
    "locon": [{"lora_down.weight", "lora_up.weight", "alpha"}],
    "loha": [{"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}],
    # the Kronecker factor w2 stored whole where it is small, else as a low-rank pair (A1111's network_lokr
    # reads both)
    "lokr": [{"lokr_w1", "lokr_w2", "alpha"}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}],
}


def _randomise(lora: KohyaLoRA, seed: int = 0) -> None:
    """Every factor nonzero (LyCORIS starts one of them at zero, so its delta is 0 until trained)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("network", list(LYCORIS_TENSORS))
def test_lycoris_files_map_onto_the_modules_they_train(tmp_path, network):
    """LyCORIS also trains the ResBlocks and samplers: SD1.5's layout has 22 ResBlocks (in_layers conv,
    emb_layers linear, out_layers conv; 14 of them a skip conv where the channels change) and 3 + 3
    samplers, 86 modules beside the 192 of plain LoRA (kohya reports 278 for LoCon on SD1.5)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    unet = build_unet(SD15_UNET, **SMALL)
    lora = KohyaLoRA(unet, rank=4, alpha=2, network=network)
    path = tmp_path / f"{network}.safetensors"
    lora.save(path)
    tensors = load_file(str(path))
    bases = {k.partition(".")[0] for k in tensors}
    assert len(bases) == 278
    mapping = a1111_module_names(unet, torch.nn.Module())
    for base in bases:
        compvis = a1111_compvis_name(base)
        assert compvis in mapping and mapping[compvis] is lora.targets[base], base
        assert {k.partition(".")[2] for k in tensors if k.partition(".")[0] == base} in LYCORIS_TENSORS[network]
    convs = [m for m in lora.targets.values() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 22 * 2 + 6
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"])["algo"] == network
    # A1111 (torch 2.1.2) multiplies LoHa / LoKr factors in the file's dtype, which fails in fp16 on the CPU
    # (seen live: "Networks with errors"); LoCon's it converts
    dtypes = {t.dtype for k, t in tensors.items() if not k.endswith(".alpha")}
    assert dtypes == {torch.float16 if network == "locon" else torch.float32}


def test_loha_delta_is_the_hadamard_product_the_webui_applies(tmp_path):
    """A1111's network_hada: W' = W + (w1a @ w1b) * (w2a @ w2b) * alpha / rank * multiplier."""
    from safetensors.torch import load_file

    unet = build_unet(SD15_UNET, **SMALL)
    lora = KohyaLoRA(unet, rank=4, alpha=2, network="loha")
    _randomise(lora)
    lora.save(tmp_path / "h.safetensors", dtype=torch.float32)
    file = load_file(str(tmp_path / "h.safetensors"))
    key, module = next((k, m) for k, m in lora.targets.items() if isinstance(m, torch.nn.Linear))
    w = {n: file[f"{key}.{n}"] for n in LYCORIS_TENSORS["loha"][0]}
    delta_w = (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"]) * w["alpha"] / 4
    x = torch.randn(3, module.in_features)
    torch.testing.assert_close(lora.layers[key].delta(x, 0.5), 0.5 * x @ delta_w.T, atol=1e-5, rtol=1e-4)


def test_lokr_delta_is_the_kronecker_product_the_webui_applies(tmp_path):
    """A1111's network_lokr: W' = W + kron(w1, w2_a @ w2_b) * alpha / rank * multiplier (w2 factorised; the
    rank is w2_b's first side)."""
    from safetensors.torch import load_file

    unet = build_unet(SD15_UNET, **SMALL)
    lora = KohyaLoRA(unet, rank=4, alpha=2, network="lokr")
    _randomise(lora, seed=2)
    lora.save(tmp_path / "k.safetensors", dtype=torch.float32)
    file = load_file(str(tmp_path / "k.safetensors"))
    key, module = next(
        (k, m) for k, m in lora.targets.items() if isinstance(m, torch.nn.Linear) and f"{k}.lokr_w2_a" in file
    )
    w2 = file[f"{key}.lokr_w2_a"] @ file[f"{key}.lokr_w2_b"]
    delta_w = torch.kron(file[f"{key}.lokr_w1"], w2) * file[f"{key}.alpha"] / file[f"{key}.lokr_w2_b"].shape[0]
    x = torch.randn(3, module.in_features)
    torch.testing.assert_close(lora.layers[key].delta(x, 0.5), 0.5 * x @ delta_w.T, atol=1e-5, rtol=1e-4)


def test_locon_delta_on_a_3x3_convolution_is_its_down_then_up(tmp_path):
    """A1111's network_lora on a conv: up(down(x)) * alpha / rank, down a 3x3 conv with the layer's padding."""
    from safetensors.torch import load_file

    unet = build_unet(SD15_UNET, **SMALL)
    lora = KohyaLoRA(unet, rank=4, alpha=2, network="locon")
    _randomise(lora, seed=1)
    lora.save(tmp_path / "c.safetensors", dtype=torch.float32)
    file = load_file(str(tmp_path / "c.safetensors"))
    key, conv = next((k, m) for k, m in lora.targets.items() if getattr(m, "kernel_size", None) == (3, 3))
    x = torch.randn(1, conv.in_channels, 8, 8)
    down = F.conv2d(x, file[f"{key}.lora_down.weight"], stride=conv.stride, padding=conv.padding)
    want = F.conv2d(down, file[f"{key}.lora_up.weight"]) * file[f"{key}.alpha"] / 4
    torch.testing.assert_close(lora.layers[key].delta(x, 1.0), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("network", list(LYCORIS_TENSORS))
def test_lycoris_patch_is_exact_and_comes_off(network, tmp_path):
    unet = build_unet(SD15_UNET, **SMALL)
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([400.0]), torch.randn(1, 7, 768)
    with torch.no_grad():
        plain = unet(x, t, context=ctx)
        lora = KohyaLoRA(unet, rank=4, alpha=4, network=network).install()
        assert torch.equal(unet(x, t, context=ctx), plain)  # one factor starts at zero
        _randomise(lora)
        dressed = unet(x, t, context=ctx)
        lora.remove()
        assert torch.equal(unet(x, t, context=ctx), plain)
        lora.save(tmp_path / "n.safetensors", dtype=torch.float32)
        again = KohyaLoRA(unet, rank=4, alpha=4, network=network)
        again.load_kohya(tmp_path / "n.safetensors")
        again.install()
        torch.testing.assert_close(unet(x, t, context=ctx), dressed)  # the file reproduces the trained delta
        again.remove()
    assert (dressed - plain).abs().max() > 1e-4
    assert not any("forward" in m.__dict__ for m in unet.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())
