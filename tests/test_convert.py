"""MagicClothing / IMAGDressing converters, on synthetic files with exactly the peers' key layouts.

The peers' own math is re-implemented here from their published attention processors (reference
UNet run once at t=0 with its attn1 inputs stored; denoising attn1 output
to_out(SDPA(Q, K, V) + scale * SDPA(Q, W_k' ref, W_v' ref))), and run on the real diffusers UNet.
"""

from __future__ import annotations

import copy
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lib_anydressing.__main__ import main
from lib_anydressing.convert import ConversionError, convert_dropped, convert_to_file, imagdressing, magicclothing
from lib_anydressing.convert.safe_load import load_tensors
from lib_anydressing.engine import Dresser, load_checkpoint, self_attention_layers
from lib_anydressing.engine.garments_net import GarmentFeatures
from lib_anydressing.generation.model_files import list_models
from lib_anydressing.sd.architectures import SD15_UNET
from lib_anydressing.sd.random_models import build_unet, reinitialise
from lib_anydressing.sd.unet_keys import convert_unet, diffusers_to_ldm

diffusers = pytest.importorskip("diffusers")

SMALL = {"model_channels": 32, "num_res_blocks": 2}


def _diffusers_unet(seed):
    unet = diffusers.UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64, 128, 128),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
    ).eval()
    reinitialise(unet, seed=seed)
    return unet


def _attn1_names(d_unet):
    """Processor index i -> the attn1 module name, in diffusers' own attn_processors order."""
    return {i: k.removesuffix(".processor") for i, k in enumerate(d_unet.attn_processors) if ".attn1." in k}


def _processor_weights(d_unet, k_name, v_name, seed):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, name in _attn1_names(d_unet).items():
        width = d_unet.get_submodule(name).to_q.in_features
        out[f"{i}.{k_name}.weight"] = torch.randn(width, width, generator=gen) * 0.2
        out[f"{i}.{v_name}.weight"] = torch.randn(width, width, generator=gen) * 0.2
    return out


@pytest.fixture
def magicclothing_files(tmp_path):
    base, extractor = _diffusers_unet(21), _diffusers_unet(22)
    weights = {
        k: v
        for k, v in extractor.state_dict().items()
        if not k.startswith(("conv_out.", "time_embedding.", "down_blocks.0.resnets.0."))
    }
    folder = tmp_path / "stable_ckpt"
    folder.mkdir()
    save_file(weights, str(folder / "garment_extractor.safetensors"))
    ip = _processor_weights(extractor, "to_k_ip", "to_v_ip", 23)
    torch.save(ip, folder / "ip_layer.pth")
    return folder, base, weights, ip


def _resampler_weights(depth=2, dim=24, emb=24):
    """IMAGDressing's Resampler key names (shapes shrunk: the converter keeps these tensors as they are)."""
    w = {
        "latents": torch.randn(1, 4, dim),
        "proj_in.weight": torch.randn(dim, emb),
        "proj_in.bias": torch.randn(dim),
        "proj_out.weight": torch.randn(dim, dim),
        "proj_out.bias": torch.randn(dim),
        "norm_out.weight": torch.randn(dim),
        "norm_out.bias": torch.randn(dim),
    }
    for j in range(depth):
        for n in ("norm1", "norm2"):
            w[f"layers.{j}.0.{n}.weight"], w[f"layers.{j}.0.{n}.bias"] = torch.randn(dim), torch.randn(dim)
        w[f"layers.{j}.0.to_q.weight"] = torch.randn(dim, dim)
        w[f"layers.{j}.0.to_kv.weight"] = torch.randn(2 * dim, dim)
        w[f"layers.{j}.0.to_out.weight"] = torch.randn(dim, dim)
        w[f"layers.{j}.1.0.weight"], w[f"layers.{j}.1.0.bias"] = torch.randn(dim), torch.randn(dim)
        w[f"layers.{j}.1.1.weight"] = torch.randn(4 * dim, dim)
        w[f"layers.{j}.1.3.weight"] = torch.randn(dim, 4 * dim)
    return w


@pytest.fixture
def imagdressing_file(tmp_path):
    ref, base = _diffusers_unet(31), _diffusers_unet(32)
    adapters = _processor_weights(ref, "to_k_ref", "to_v_ref", 33)
    module = {f"ref_unet.{k}": v for k, v in ref.state_dict().items()}
    module |= {f"unet.{k}": v for k, v in base.state_dict().items()}
    module |= {f"adapter_modules.{k}": v for k, v in adapters.items()}
    module |= {f"proj.{k}": v for k, v in _resampler_weights().items()}
    path = tmp_path / "IMAGDressing-v1_512.pt"
    torch.save({"module": module}, path)
    return path, ref, adapters, module


def test_magicclothing_every_key_lands_on_its_layer(magicclothing_files):
    folder, _, weights, ip = magicclothing_files
    conversion = magicclothing.convert([folder])
    model = conversion.model
    assert len(conversion.used) == len(weights) + len(ip) and not conversion.ignored
    assert model.garments_net_weights.keys() == {diffusers_to_ldm(k) for k in weights}
    for key, t in weights.items():
        assert torch.equal(model.garments_net_weights[diffusers_to_ldm(key)], t)
    names = _attn1_names(_diffusers_unet(0))
    for i, name in names.items():
        k, v = model.projections.pair(diffusers_to_ldm(name.removesuffix(".attn1") + ".")[:-1])
        assert torch.equal(k.weight, ip[f"{i}.to_k_ip.weight"]) and torch.equal(v.weight, ip[f"{i}.to_v_ip.weight"])
    assert model.info.tap == "attn_input" and model.info.cross_attention == "empty_prompt"
    assert "non-commercial" in model.info.license


def _peer_reference_features(ref_unet, latents, context):
    """The peers' reference pass: t=0, empty-prompt context, every attn1 input stored."""
    store, handles = {}, []
    for name in _attn1_names(ref_unet).values():
        module = ref_unet.get_submodule(name)
        handles.append(module.register_forward_pre_hook(lambda m, a, n=name: store.setdefault(n, a[0])))
    with torch.no_grad():
        ref_unet(latents, 0, encoder_hidden_states=context)
    for h in handles:
        h.remove()
    return store


def test_magicclothing_features_equal_the_peer_reference_pass(magicclothing_files):
    folder, base, weights, _ = magicclothing_files
    model = magicclothing.convert([folder]).model
    peer_ref = copy.deepcopy(base)
    peer_ref.load_state_dict(weights, strict=False)  # as MagicClothing loads its extractor
    ldm_base = build_unet(SD15_UNET, **SMALL)
    ldm_base.load_state_dict(convert_unet(base.state_dict()))
    latents, empty_prompt = torch.randn(2, 4, 16, 16), torch.randn(1, 77, 768)
    ours = model.garments_net(ldm_base).extract(latents, context=empty_prompt)
    theirs = _peer_reference_features(peer_ref, latents, empty_prompt.expand(2, -1, -1))
    for name, f in theirs.items():
        want = ours.per_layer[diffusers_to_ldm(name.removesuffix(".attn1") + ".")[:-1]]
        assert (f - want).norm() <= 1e-5 * f.norm()


def _peer_attn1(attn, hidden, ref, w_k, w_v, scale):
    """MagicClothing's StableREFAttnProcessor2_0 / IMAGDressing's RefSAttnProcessor2_0, from their code."""
    b, h = hidden.shape[0], attn.heads

    def heads(t):
        return t.view(t.shape[0], -1, h, t.shape[-1] // h).transpose(1, 2)

    q, k, v = heads(attn.to_q(hidden)), heads(attn.to_k(hidden)), heads(attn.to_v(hidden))
    out = F.scaled_dot_product_attention(q, k, v)
    ref_k, ref_v = heads(F.linear(ref, w_k)), heads(F.linear(ref, w_v))
    out = out + scale * F.scaled_dot_product_attention(q, ref_k, ref_v)
    return attn.to_out(out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1]))


@pytest.mark.parametrize("peer", ["magicclothing", "imagdressing"])
def test_dressing_attention_equals_peer_processor(peer, magicclothing_files, imagdressing_file):
    if peer == "magicclothing":
        folder, _, _, weights = magicclothing_files
        model, k_name, v_name = magicclothing.convert([folder]).model, "to_k_ip", "to_v_ip"
    else:
        path, _, adapters, _ = imagdressing_file
        model, k_name, v_name, weights = imagdressing.convert([path]).model, "to_k_ref", "to_v_ref", adapters
    unet = build_unet(SD15_UNET, **SMALL)
    layers = self_attention_layers(unet)
    gen = torch.Generator().manual_seed(5)
    refs = {layer.name: torch.randn(1, 12, layer.dim, generator=gen) for layer in layers}
    features = GarmentFeatures(refs, 1)
    names = _attn1_names(_diffusers_unet(0))
    with torch.no_grad(), Dresser(unet, features, model.projections, strength=model.info.default_strength):
        for i, name in names.items():
            layer = next(x for x in layers if x.name == diffusers_to_ldm(name.removesuffix(".attn1") + ".")[:-1])
            hidden = torch.randn(2, 20, layer.dim, generator=gen)
            got = layer.attn(hidden)
            want = _peer_attn1(
                layer.attn,
                hidden,
                refs[layer.name],
                weights[f"{i}.{k_name}.weight"],
                weights[f"{i}.{v_name}.weight"],
                scale=1.0,
            )
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_imagdressing_keys_all_accounted_for(imagdressing_file, tmp_path):
    path, ref, adapters, module = imagdressing_file
    conversion = imagdressing.convert([path])
    assert set(conversion.used) | set(conversion.ignored) == set(module)
    assert set(conversion.ignored) == {k for k in module if k.startswith("unet.")}
    model = conversion.model
    for key, t in ref.state_dict().items():
        assert torch.equal(model.garments_net_weights[diffusers_to_ldm(key)], t)
    assert not model.info.garments_net_partial
    out = tmp_path / "imag.safetensors"
    convert_to_file("imagdressing", [path], out)
    loaded = load_checkpoint(out)
    assert loaded.resampler_weights.keys() == _resampler_weights().keys()
    assert all(torch.equal(loaded.resampler_weights[k], module[f"proj.{k}"]) for k in loaded.resampler_weights)


class _RunsCode:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (str(self.sentinel), "w"))


@pytest.mark.parametrize("fmt", ["torch_zip", "plain_pickle"])
def test_malicious_pickle_is_refused_and_never_run(tmp_path, fmt):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "IMAGDressing-v1_512.pt"
    payload = {"module": {"ref_unet.x": torch.zeros(1), "trap": _RunsCode(sentinel)}}
    if fmt == "torch_zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(ConversionError, match="refused and not loaded"):
        imagdressing.convert([path])
    assert not sentinel.exists()


def test_truncated_and_wrong_files(magicclothing_files, imagdressing_file, tmp_path):
    path = imagdressing_file[0]
    data = path.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(ConversionError, match="truncated or not a torch weights file"):
        imagdressing.convert([cut])
    folder = magicclothing_files[0]
    with pytest.raises(ConversionError, match="MagicClothing needs both"):
        magicclothing.convert([folder / "ip_layer.pth"])
    lora = tmp_path / "lora" / "garment_extractor.safetensors"
    lora.parent.mkdir()
    save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(2, 2)}, str(lora))
    torch.save(torch.load(folder / "ip_layer.pth"), lora.parent / "ip_layer.pth")
    with pytest.raises(ConversionError, match="not a key of an SD1.x diffusers UNet"):
        magicclothing.convert([lora.parent])
    ip = torch.load(folder / "ip_layer.pth")
    del ip["30.to_v_ip.weight"]
    torch.save(ip, folder / "ip_layer.pth")
    with pytest.raises(ConversionError, match="'30.to_v_ip.weight' is missing"):
        magicclothing.convert([folder])
    torch.save({"module": {"proj.latents": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(ConversionError, match="no 'ref_unet.\\*' tensors"):
        imagdressing.convert([tmp_path / "other.pt"])
    assert load_tensors(folder / "garment_extractor.safetensors")


def test_cli_convert_and_overwrite_guard(magicclothing_files, tmp_path, capsys):
    folder = magicclothing_files[0]
    out = tmp_path / "models" / "mc.safetensors"
    assert main(["convert", "--from", "magicclothing", "--in", str(folder), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "non-commercial" in printed and load_checkpoint(out).info.origin.startswith("MagicClothing")
    assert main(["convert", "--from", "magicclothing", "--in", str(folder), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().out


def test_files_dropped_into_models_folder_are_converted_once(magicclothing_files, imagdressing_file, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    os.replace(magicclothing_files[0], models / "stable_ckpt")
    os.replace(imagdressing_file[0], models / "IMAGDressing-v1_512.pt")
    messages = convert_dropped(models)
    assert len(messages) == 2 and all(m.startswith("converted") for m in messages)
    assert set(list_models([models])) == {"IMAGDressing-v1_512", "magicclothing-stable_ckpt"}
    assert convert_dropped(models) == []


def test_demo_runs_a_converted_model(imagdressing_file, tmp_path, capsys):
    """The converted file dresses an ldm UNet end to end (the demo's random UNet has the same layout)."""
    out = tmp_path / "imag.safetensors"
    convert_to_file("imagdressing", [imagdressing_file[0]], out)
    args = ["demo", "--model", str(out), "--model-channels", "32", "--steps", "2", "--size", "64", "128"]
    assert main([*args, "--garment-size", "64", "64", "--out", str(tmp_path / "d.png")]) == 0
    printed = capsys.readouterr().out
    assert "no image encoder is set" in printed and "UNet restored bit-identically: yes" in printed
