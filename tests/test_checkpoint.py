"""The checkpoint format: exact round trip, and an error naming the problem for every bad file."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from lib_anydressing.engine import (
    AnyDressingModel,
    CheckpointError,
    Dresser,
    DressingProjections,
    GarmentLoRA,
    ModelInfo,
    load_checkpoint,
    save_checkpoint,
    self_attention_layers,
)
from lib_anydressing.sd.architectures import TINY_UNET
from lib_anydressing.sd.random_models import build_unet, reinitialise

from conftest import run


def _model(unet, *, own_net=True, base="sd15"):
    dims = {layer.name: (layer.dim, layer.inner_dim) for layer in self_attention_layers(unet)}
    lora = GarmentLoRA(dims, n_slots=3, rank=2, alpha=1.0)
    proj = DressingProjections.from_unet(unet)
    reinitialise(lora, seed=7)
    reinitialise(proj, seed=8)
    weights = {k: v.clone() + 0.01 for k, v in unet.state_dict().items() if ".attn2." not in k} if own_net else None
    info = ModelInfo(
        base=base,
        slots=["upper", "lower", "hat"],
        lora_rank=2,
        lora_alpha=1.0,
        default_strength=0.7,
        license="test",
        recommended={"strength": 0.7},
    )
    return AnyDressingModel(info, proj.requires_grad_(False), lora.requires_grad_(False), weights)


def test_round_trip_is_exact(unet, tmp_path):
    model = _model(unet)
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, path)
    loaded = load_checkpoint(path)
    assert loaded.info == model.info
    a, b = model.state_dict_for_file(), loaded.state_dict_for_file()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_half_precision_file_keeps_its_dtype(unet, tmp_path):
    model = _model(unet, own_net=False)
    model.projections.half()
    save_checkpoint(model, tmp_path / "h.safetensors")
    k, _ = load_checkpoint(tmp_path / "h.safetensors").projections.pair(self_attention_layers(unet)[0].name)
    assert k.weight.dtype == torch.float16


def test_loaded_checkpoint_dresses_the_unet(unet, inputs, garments, tmp_path):
    save_checkpoint(_model(unet), tmp_path / "m.safetensors")
    model = load_checkpoint(tmp_path / "m.safetensors")
    gnet = model.garments_net(unet)
    assert gnet.unet is not unet and gnet.lora is model.lora
    with torch.no_grad():
        feats = gnet.extract(garments, slots=[0, 1])
    plain = run(unet, *inputs)
    with Dresser(unet, feats, model.projections, strength=model.info.default_strength):
        dressed = run(unet, *inputs)
    assert (dressed - plain).abs().max() > 1e-3
    assert torch.equal(run(unet, *inputs), plain)


def test_model_for_another_architecture_is_refused(unet, tmp_path):
    save_checkpoint(_model(unet, base="sdxl"), tmp_path / "xl.safetensors")
    with pytest.raises(CheckpointError, match="for sdxl, but the loaded model is sd15"):
        load_checkpoint(tmp_path / "xl.safetensors").garments_net(unet)


def test_model_with_other_layer_widths_is_refused(unet, tmp_path):
    wider = build_unet(TINY_UNET, model_channels=64)
    save_checkpoint(_model(wider, own_net=False), tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="Dressing-Attention is 64->64, the UNet is 32->32"):
        load_checkpoint(tmp_path / "w.safetensors").check_compatible(unet)


def test_truncated_file(unet, tmp_path):
    path = tmp_path / "m.safetensors"
    save_checkpoint(_model(unet), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="'m.safetensors' is not a readable safetensors file"):
        load_checkpoint(path)


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(pickle.dumps({"state_dict": [1, 2, 3]}))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_safetensors_without_anydressing_metadata(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(path), metadata={"ss_network_dim": "2"})
    with pytest.raises(CheckpointError, match="is not an AnyDressing checkpoint"):
        load_checkpoint(path)


def test_newer_format_version(unet, tmp_path):
    model = _model(unet, own_net=False)
    meta = model.info.to_metadata() | {"anydressing.format_version": "99"}
    save_file(model.state_dict_for_file(), str(tmp_path / "new.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(tmp_path / "new.safetensors")


def test_inconsistent_tensors(unet, tmp_path):
    tensors = _model(unet, own_net=False).state_dict_for_file()
    name = self_attention_layers(unet)[0].name
    del tensors[f"da.{name}.to_v"]
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=ModelInfo().to_metadata())
    with pytest.raises(CheckpointError, match=f"inconsistent tensors: .*da.{name}.to_v|{name}.to_v"):
        load_checkpoint(tmp_path / "bad.safetensors")


@pytest.mark.parametrize(
    "field, value, message",
    [("tap", "attn_middle", "'anydressing.tap' is 'attn_middle'"), ("lora_rank", "{16", "not valid JSON")],
)
def test_bad_metadata_is_named(unet, tmp_path, field, value, message):
    model = _model(unet, own_net=False)
    meta = model.info.to_metadata() | {f"anydressing.{field}": value}
    save_file(model.state_dict_for_file(), str(tmp_path / "m.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "m.safetensors")
