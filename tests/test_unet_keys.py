"""The diffusers -> ldm UNet mapping, checked against the real diffusers and ldm classes by value."""

from __future__ import annotations

import pytest
import torch

from lib_anydressing.engine import self_attention_layers
from lib_anydressing.sd.architectures import SD15_UNET
from lib_anydressing.sd.random_models import build_unet, reinitialise
from lib_anydressing.sd.unet_keys import convert_unet, diffusers_to_ldm, self_attention_processor_order

diffusers = pytest.importorskip("diffusers")

SMALL = {"model_channels": 32, "num_res_blocks": 2}  # SD1.5 layer order, narrow


def _diffusers_unet():
    unet = diffusers.UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64, 128, 128),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,  # diffusers' name for SD1.x's head count
    ).eval()
    reinitialise(unet, seed=11)
    return unet


def test_converted_diffusers_unet_computes_the_same_as_ldm():
    d_unet = _diffusers_unet()
    l_unet = build_unet(SD15_UNET, **SMALL)
    converted = convert_unet(d_unet.state_dict())
    assert converted.keys() == l_unet.state_dict().keys()
    l_unet.load_state_dict(converted, strict=True)
    x = torch.randn(2, 4, 16, 24)
    t = torch.tensor([10, 900])
    ctx = torch.randn(2, 5, 768)
    with torch.no_grad():
        want = d_unet(x, t, encoder_hidden_states=ctx).sample
        got = l_unet(x, t, context=ctx)
    assert (got - want).norm() <= 1e-5 * want.norm()


def test_processor_order_matches_diffusers_and_ldm():
    d_unet = _diffusers_unet()
    l_unet = build_unet(SD15_UNET, **SMALL)
    attn1 = [k.removesuffix(".attn1.processor") for k in d_unet.attn_processors if ".attn1." in k]
    assert self_attention_processor_order() == [diffusers_to_ldm(n + ".")[:-1] for n in attn1]
    assert sorted(self_attention_processor_order()) == sorted(layer.name for layer in self_attention_layers(l_unet))
    assert self_attention_processor_order()[-1] == "middle_block.1.transformer_blocks.0"


def test_unknown_key_is_named():
    with pytest.raises(KeyError, match="'text_model.embeddings.x' is not a key"):
        diffusers_to_ldm("text_model.embeddings.x")


def test_ldm_to_diffusers_inverts_the_mapping():
    from lib_anydressing.sd.unet_keys import ldm_to_diffusers

    keys = list(_diffusers_unet().state_dict())
    assert [ldm_to_diffusers(diffusers_to_ldm(k)) for k in keys] == keys
    with pytest.raises(KeyError, match="not a key of an SD1.x ldm UNet"):
        ldm_to_diffusers("cond_stage_model.transformer.x")
