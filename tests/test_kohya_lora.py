"""The garment LoRA's file: kohya keys that the WebUI's Lora extension maps onto real modules, exact patching,
the hashes the WebUI computes."""

from __future__ import annotations

import hashlib
import re

import torch

from lib_anydressing.garment_lora.kohya_lora import KohyaLoRA
from lib_anydressing.sd.architectures import SD15_UNET
from lib_anydressing.sd.random_models import build_unet, tiny_stable_diffusion

SMALL = {"model_channels": 32, "num_res_blocks": 2}  # SD1.5 block layout, narrow


def a1111_compvis_name(key: str) -> str | None:
    """The UNet rules of A1111 1.10's extensions-builtin/Lora/networks.py convert_diffusers_name_to_compvis,
    restated: diffusers block numbers to ldm ones, attention suffixes kept."""
    if m := re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        b, kind, a, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"diffusion_model_input_blocks_{1 + b * 3 + a}_{1 if kind == 'attentions' else 0}_{rest}"
    if m := re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key):
        return f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{m[3]}"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        b, kind, a, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"diffusion_model_output_blocks_{b * 3 + a}_{1 if kind == 'attentions' else 0}_{rest}"
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
