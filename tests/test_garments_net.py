"""GarmentsNet: one batched pass at t=0, per-slot LoRA routing, tap points, cross-attention modes."""

from __future__ import annotations

import pytest
import torch

from lib_anydressing.engine import GarmentLoRA, GarmentsNet, self_attention_layers


def _lora(unet, n_slots=3, rank=2):
    dims = {layer.name: (layer.dim, layer.inner_dim) for layer in self_attention_layers(unet)}
    lora = GarmentLoRA(dims, n_slots, rank, alpha=rank).requires_grad_(False)
    gen = torch.Generator().manual_seed(5)
    for p in lora.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return lora


def _capture_plain_inputs(unet, garments):
    """attn1 inputs of a plain forward at t=0 with cross-attention silenced, via ordinary torch hooks."""
    seen, handles = {}, []
    for layer in self_attention_layers(unet):
        handles.append(layer.attn.register_forward_pre_hook(lambda m, a, n=layer.name: seen.setdefault(n, a[0])))
        handles.append(layer.block.attn2.register_forward_hook(lambda m, a, out: torch.zeros_like(out)))
    with torch.no_grad():
        unet(garments, torch.zeros(garments.shape[0]), context=torch.zeros(garments.shape[0], 1, 768))
    for h in handles:
        h.remove()
    return seen


def test_attn_input_tap_matches_plain_forward(unet, garments):
    feats = GarmentsNet(unet, shared=True, tap="attn_input").extract(garments)
    want = _capture_plain_inputs(unet, garments)
    assert list(feats.per_layer) == [layer.name for layer in self_attention_layers(unet)]
    for name, f in feats.per_layer.items():
        torch.testing.assert_close(f, want[name], atol=1e-6, rtol=1e-6)


def test_attn_output_tap_is_the_self_attention_result(unet, garments):
    ins = GarmentsNet(unet, shared=True, tap="attn_input").extract(garments)
    outs = GarmentsNet(unet, shared=True, tap="attn_output").extract(garments)
    for layer in self_attention_layers(unet):
        with torch.no_grad():
            want = layer.attn(ins.per_layer[layer.name])
        torch.testing.assert_close(outs.per_layer[layer.name], want, atol=1e-5, rtol=1e-5)


def test_batched_extraction_equals_one_garment_at_a_time(unet, garments):
    gnet = GarmentsNet(unet, shared=True, lora=_lora(unet))
    both = gnet.extract(garments, slots=[0, 2])
    first = gnet.extract(garments[:1], slots=[0])
    second = gnet.extract(garments[1:], slots=[2])
    for name in both.per_layer:
        for got, want in (
            (both.per_layer[name][0], first.per_layer[name][0]),
            (both.per_layer[name][1], second.per_layer[name][0]),
        ):
            assert (got - want).norm() <= 1e-4 * want.norm()  # batched GEMMs round differently, nothing more


def test_one_unet_call_for_all_garments(unet, garments):
    calls = []
    handle = unet.time_embed.register_forward_hook(lambda *a: calls.append(1))
    GarmentsNet(unet, shared=True).extract(torch.cat([garments, garments]))
    handle.remove()
    assert len(calls) == 1


def test_changing_slot_two_lora_changes_only_garment_two(unet, garments):
    lora = _lora(unet)
    gnet = GarmentsNet(unet, shared=True, lora=lora)
    before = gnet.extract(garments, slots=[0, 1])
    with torch.no_grad():
        for name in lora.layer_names:
            for slot_lora in lora.for_layer(name).values():
                slot_lora.up[1] += 0.3
                slot_lora.down[2] += 0.3  # a slot nobody uses: changes nothing
    after = gnet.extract(garments, slots=[0, 1])
    for name in before.per_layer:
        assert torch.equal(after.per_layer[name][0], before.per_layer[name][0])
        assert (after.per_layer[name][1] - before.per_layer[name][1]).abs().max() > 1e-4


def test_extraction_leaves_shared_unet_untouched(unet, inputs, garments):
    x, t, ctx = inputs
    with torch.no_grad():
        plain = unet(x, t, context=ctx)
    GarmentsNet(unet, shared=True, lora=_lora(unet)).extract(garments)
    with torch.no_grad():
        assert torch.equal(unet(x, t, context=ctx), plain)
    assert not any("forward" in m.__dict__ for m in unet.modules())


def test_cross_attention_modes(unet, garments):
    skip = GarmentsNet(unet, shared=True, cross_attention="skip")
    ctx_a, ctx_b = torch.randn(1, 7, 768), torch.randn(1, 7, 768)
    a = skip.extract(garments, context=ctx_a)
    b = skip.extract(garments, context=ctx_b)
    assert all(torch.equal(a.per_layer[n], b.per_layer[n]) for n in a.per_layer)
    empty = GarmentsNet(unet, shared=True, cross_attention="empty_prompt")
    with pytest.raises(ValueError, match="empty-prompt"):
        empty.extract(garments)
    c = empty.extract(garments, context=ctx_a)
    d = empty.extract(garments, context=ctx_b)
    last = list(c.per_layer)[-1]
    assert (c.per_layer[last] - d.per_layer[last]).abs().max() > 1e-4


def test_separate_garments_net_from_state_dict(unet, garments):
    """A GarmentsNet loaded from weights equal to the UNet's gives the shared net's features."""
    weights = {k: v.clone() for k, v in unet.state_dict().items() if ".attn2." not in k}
    attn = self_attention_layers(unet)[0].attn
    attn.forward = lambda *a, **k: (_ for _ in ()).throw(AssertionError("another extension's hook was copied"))
    own = GarmentsNet.from_state_dict(unet, weights)
    del attn.forward
    shared = GarmentsNet(unet, shared=True)
    assert own.unet is not unet
    f_own, f_shared = own.extract(garments), shared.extract(garments)
    for name in f_own.per_layer:
        torch.testing.assert_close(f_own.per_layer[name], f_shared.per_layer[name], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="missing"):
        GarmentsNet.from_state_dict(unet, {k: v for k, v in list(weights.items())[1:]})


def test_bad_slot_indices(unet, garments):
    gnet = GarmentsNet(unet, shared=True, lora=_lora(unet, n_slots=2))
    with pytest.raises(ValueError, match="out of range"):
        gnet.extract(garments, slots=[0, 2])
    with pytest.raises(ValueError, match="slot indices"):
        gnet.extract(garments, slots=[0])


def test_structure_copy_leaves_webui_state_behind(unet, garments):
    """A1111 Lora's bookkeeping and torch hooks on the user's UNet must not reach a separate GarmentsNet."""
    attn = self_attention_layers(unet)[0].attn
    attn.to_q.network_layer_name = "diffusion_model_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    attn.to_q.network_weights_backup = attn.to_q.weight.clone()
    handle = unet.input_blocks[1].register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(AssertionError("hook")))
    weights = {k: v.clone() for k, v in unet.state_dict().items() if ".attn2." not in k}
    own = GarmentsNet.from_state_dict(unet, weights)
    handle.remove()
    copied = self_attention_layers(own.unet)[0].attn.to_q
    assert not hasattr(copied, "network_layer_name") and not hasattr(copied, "network_weights_backup")
    assert not any(m._forward_pre_hooks for m in own.unet.modules())
    own.extract(garments)  # the copied hook would raise


def test_unet_with_a_pooled_input_gets_zeros(garments):
    """ldm's UNetModel asserts `y` when it has class/pooled inputs, as SDXL's does: extraction supplies zeros."""
    from lib_anydressing.sd.architectures import TINY_UNET
    from lib_anydressing.sd.random_models import build_unet

    unet = build_unet(TINY_UNET, num_classes="continuous")  # a Linear pooled input, like SDXL's label_emb
    feats = GarmentsNet(unet, shared=True).extract(garments)
    assert len(feats.per_layer) == len(self_attention_layers(unet))


class _ForgeLinear(torch.nn.Module):
    """Forge's Linear (backend.operations.ForgeOperations.Linear) is a plain nn.Module with `in_features`,
    `weight` and `bias`, not an nn.Linear subclass; Forge cannot be installed, so this mirrors it."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        gen = torch.Generator().manual_seed(in_features)
        self.weight = torch.nn.Parameter(torch.randn(out_features, in_features, generator=gen) * in_features**-0.5)
        self.bias = torch.nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)


def test_sdxl_pooled_input_on_forge_gets_zeros(garments):
    """SDXL's label_emb (sgm: num_classes="sequential") is Sequential(Sequential(Linear(adm_in_channels,
    emb), SiLU, Linear(emb, emb))); on Forge those Linears are Forge's. The ldm UNet's label_emb is
    rebuilt that way: extraction must pass zeros of adm_in_channels, not class labels."""
    from lib_anydressing.sd.architectures import TINY_UNET
    from lib_anydressing.sd.random_models import build_unet

    unet = build_unet(TINY_UNET, num_classes="continuous")
    emb, adm_in_channels = unet.label_emb.out_features, 12
    unet.label_emb = torch.nn.Sequential(
        torch.nn.Sequential(_ForgeLinear(adm_in_channels, emb), torch.nn.SiLU(), _ForgeLinear(emb, emb))
    )
    seen = []
    unet.label_emb.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    feats = GarmentsNet(unet, shared=True).extract(garments)
    assert len(feats.per_layer) == len(self_attention_layers(unet))
    assert seen[0].dtype == garments.dtype and seen[0].shape == (garments.shape[0], adm_in_channels)
    assert not seen[0].any()


def test_gfe_lora_equals_its_deltas_merged_into_q_k_v(unet, garments):
    """Reference computed independently: each slot's (alpha / rank) * up @ down merged into a copy's to_q,
    to_k, to_v weights (alpha != rank, and q/k/v deltas all different, so a wrong scale or a delta on the
    wrong projection shows)."""
    import copy

    dims = {layer.name: (layer.dim, layer.inner_dim) for layer in self_attention_layers(unet)}
    lora = GarmentLoRA(dims, 2, rank=2, alpha=3.0).requires_grad_(False)
    gen = torch.Generator().manual_seed(6)
    for p in lora.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    with torch.no_grad():
        feats = GarmentsNet(unet, shared=True, lora=lora).extract(garments, slots=[1, 0])
        for row, slot in enumerate([1, 0]):
            merged = copy.deepcopy(unet)
            for layer in self_attention_layers(merged):
                for p in ("q", "k", "v"):
                    delta = lora.for_layer(layer.name)[p]
                    getattr(layer.attn, f"to_{p}").weight += 1.5 * delta.up[slot] @ delta.down[slot]
            want = GarmentsNet(merged, shared=True).extract(garments[row : row + 1])
            for name in feats.per_layer:
                torch.testing.assert_close(feats.per_layer[name][row], want.per_layer[name][0], atol=1e-4, rtol=1e-4)
