"""Nothing lost, nothing left behind: the UNet is exactly as before after any use of the engine."""

from __future__ import annotations

import pytest
import torch

from lib_anydressing.engine import (
    AnyDressingModel,
    Dresser,
    DressingProjections,
    GarmentsNet,
    remove_dressing,
    self_attention_layers,
)

from conftest import run


def _features(unet, garments, tap="attn_output"):
    with torch.no_grad():
        return GarmentsNet(unet, shared=True, tap=tap).extract(garments)


def _state(unet):
    return {k: v.clone() for k, v in unet.state_dict().items()}


def _assert_same_state(unet, before):
    after = unet.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not any("forward" in m.__dict__ for m in unet.modules())
    assert not unet._forward_pre_hooks


@pytest.mark.parametrize("additive", [True, False])
def test_install_remove_is_bit_identical(unet, inputs, garments, additive):
    plain = run(unet, *inputs)
    before = _state(unet)
    proj = DressingProjections.from_unet(unet) if additive else None
    with Dresser(unet, _features(unet, garments), proj, strength=0.9):
        dressed = run(unet, *inputs)
    assert (dressed - plain).abs().max() > 1e-3  # the garments did change the output
    assert torch.equal(run(unet, *inputs), plain)
    _assert_same_state(unet, before)


def test_forward_that_raises_midway_leaves_model_clean(unet, inputs, garments):
    plain = run(unet, *inputs)
    before = _state(unet)
    dresser = Dresser(unet, _features(unet, garments), DressingProjections.from_unet(unet))
    dresser.cond_rows = [5]  # out of range: raises inside the first patched layer, mid-forward
    with pytest.raises(IndexError), dresser:
        run(unet, *inputs)
    assert not dresser.installed
    assert torch.equal(run(unet, *inputs), plain)
    _assert_same_state(unet, before)


def test_installing_twice_does_not_stack(unet, inputs, garments):
    feats = _features(unet, garments)
    proj = DressingProjections.from_unet(unet)
    with Dresser(unet, feats, proj, strength=0.5):
        once = run(unet, *inputs)
    first = Dresser(unet, feats, proj, strength=0.5).install()
    second = Dresser(unet, feats, proj, strength=0.5).install()
    assert not first.installed
    assert torch.equal(run(unet, *inputs), once)
    assert remove_dressing(unet)
    assert not second.installed
    assert not remove_dressing(unet)


def test_restores_another_extensions_override(unet, inputs, garments):
    """A forward overridden on the instance before we install is back, and still active, after remove."""
    attn = unet.input_blocks[1][1].transformer_blocks[0].attn1
    calls = []

    def theirs(x, context=None, mask=None):
        calls.append(1)
        return type(attn).forward(attn, x, context, mask)

    attn.forward = theirs
    with Dresser(unet, _features(unet, garments), DressingProjections.from_unet(unet)):
        run(unet, *inputs)
    assert calls, "the override underneath must still be called while dressed"
    assert attn.__dict__["forward"] is theirs


@pytest.mark.parametrize("additive", [True, False])
def test_strength_zero_or_no_garment_equals_plain(unet, inputs, garments, additive):
    plain = run(unet, *inputs)
    proj = DressingProjections.from_unet(unet) if additive else None
    feats = _features(unet, garments)
    with Dresser(unet, feats, proj, strength=0.0):
        assert (run(unet, *inputs) - plain).abs().max() <= 1e-6
    with Dresser(unet, feats, proj, strength=0.8, weights=[0.0, 0.0]):
        assert (run(unet, *inputs) - plain).abs().max() <= 1e-6


def test_inactive_range_is_plain(unet, inputs, garments):
    plain = run(unet, *inputs)
    with Dresser(unet, _features(unet, garments), DressingProjections.from_unet(unet)) as dresser:
        dresser.active = False
        assert torch.equal(run(unet, *inputs), plain)


def test_training_free_extraction_shares_weights(unet, garments):
    gnet = AnyDressingModel.training_free().garments_net(unet)
    assert gnet.unet is unet
    assert not list(gnet.parameters()), "the user's UNet must not become a submodule (no copy, no move)"


def test_call_on_another_batch_size_sees_no_garments(unet, garments):
    """ControlNet's reference-only runs attn1 on a sub-batch: no wrong rows, no IndexError."""
    layer = self_attention_layers(unet)[0]
    tokens = torch.randn(1, 16, layer.dim)
    with torch.no_grad(), Dresser(unet, _features(unet, garments), DressingProjections.from_unet(unet)) as dresser:
        dresser.cond_rows, dresser.cond_batch = [1], 2
        sub_batch = layer.attn(tokens)
    assert torch.equal(sub_batch, layer.attn(tokens))


def test_row_indices_built_once_per_layout_not_per_layer(unet, inputs, garments):
    with torch.no_grad(), Dresser(unet, _features(unet, garments), DressingProjections.from_unet(unet)) as dresser:
        dresser.cond_rows, dresser.cond_batch = [0], 2
        run(unet, *inputs)
        run(unet, *inputs)
        assert len(dresser._row_split) == 1  # 10 layers x 2 calls, one layout: built once
        dresser.cond_rows = [1]
        run(unet, *inputs)
        assert len(dresser._row_split) == 2
    assert not dresser._row_split  # remove() drops them with the rest
