"""Dressing-Attention against the paper's equations, written here from docs/method.md, not from the engine."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lib_anydressing.engine import Dresser, DressingProjections, GarmentsNet, self_attention_layers
from lib_anydressing.engine.garments_net import GarmentFeatures

from conftest import LATENT, run


def _heads(t, h):
    b, n, _ = t.shape
    return t.reshape(b, n, h, -1).permute(0, 2, 1, 3)


def _softmax_attn(q, k, v, bias=None):
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias
    return s.softmax(-1) @ v


def _unheads(t):
    b, h, n, d = t.shape
    return t.permute(0, 2, 1, 3).reshape(b, n, h * d)


def _single_layer_features(layer, n_garments, tokens, seed=3):
    f = torch.randn(n_garments, tokens, layer.dim, generator=torch.Generator().manual_seed(seed))
    return GarmentFeatures({layer.name: f}, n_garments)


@pytest.fixture
def layer_unet(unet):
    """The UNet with a single-layer view: dress only the first self-attention layer."""
    layer = self_attention_layers(unet)[0]
    return unet, layer


def _dress_layer(unet, layer, feats, proj, **kw):
    # Patch through the public API, then call that layer's attn1 directly.
    full = GarmentFeatures(
        {
            n.name: feats.per_layer.get(n.name, torch.zeros(feats.n_garments, 16, n.dim))
            for n in self_attention_layers(unet)
        },
        feats.n_garments,
        feats.latent_hw,
    )
    return Dresser(unet, full, proj, **kw)


def _trained_projections(unet, layer):
    """Dressing-Attention projections whose W'_k/W'_v at `layer` differ from the UNet's W_k/W_v."""
    proj = DressingProjections.from_unet(unet)
    wk, wv = proj.pair(layer.name)
    torch.nn.init.normal_(wk.weight, std=0.3)
    torch.nn.init.normal_(wv.weight, std=0.3)
    return proj, wk, wv


def _windows(f, grid, s):
    """Each s x s window of an (N, h*w, C) token grid, row by row: (means (N, T', C), token counts (T',))."""
    n, _, c = f.shape
    h, w = grid
    g = f.reshape(n, h, w, c)
    corners = [(top, left) for top in range(0, h, s) for left in range(0, w, s)]
    windows = [g[:, top : top + s, left : left + s].reshape(n, -1, c) for top, left in corners]
    return torch.stack([win.mean(1) for win in windows], 1), torch.tensor([float(win.shape[1]) for win in windows])


@pytest.mark.parametrize("grid", [(4, 6), (5, 6)])  # 5 rows: the bottom windows hold 2 tokens, not 4
def test_pooled_additive_is_equation_6_over_pooled_tokens(layer_unet, grid):
    """Eq. 6 with K'/V' from the window means, each mean standing for its tokens (logit + log count)."""
    unet, layer = layer_unet
    attn, h = layer.attn, layer.attn.heads
    proj, wk, wv = _trained_projections(unet, layer)
    f = torch.randn(2, grid[0] * grid[1], layer.dim, generator=torch.Generator().manual_seed(5))
    feats = GarmentFeatures({layer.name: f}, 2, grid)  # the only layer with more than 16 tokens: the finest
    x = torch.randn(3, 20, layer.dim)
    lam, w = 0.7, [1.0, 0.4]
    with torch.no_grad(), _dress_layer(unet, layer, feats, proj, strength=lam, weights=w, fine_pool=2) as dresser:
        got = attn(x)
        means, counts = _windows(f, grid, 2)
        t = means.shape[1]
        f_all = means.reshape(1, 2 * t, -1)
        q, k, v = (_heads(attn.to_q(x), h), _heads(attn.to_k(x), h), _heads(attn.to_v(x), h))
        kp = _heads(wk(f_all), h)
        vp = _heads(wv(f_all) * torch.tensor([w[0]] * t + [w[1]] * t)[None, :, None], h)
        z = _softmax_attn(q, k, v) + lam * _softmax_attn(q, kp, vp, counts.log().repeat(2))
        want = attn.to_out(_unheads(z))
        assert dresser.garment_tokens[layer.name] == 2 * t < f.shape[1] * 2
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pool", [2, 4])
@pytest.mark.parametrize("additive", [True, False])
def test_pooling_windows_of_equal_tokens_changes_nothing(layer_unet, additive, pool):
    """s x s equal keys in a softmax weigh as one key with log(s * s) added: pooled equals full."""
    unet, layer = layer_unet
    coarse = torch.randn(2, 2, 3, layer.dim, generator=torch.Generator().manual_seed(6))
    fine = coarse.repeat_interleave(pool, 1).repeat_interleave(pool, 2).reshape(2, -1, layer.dim)
    feats = GarmentFeatures({layer.name: fine}, 2, (2 * pool, 3 * pool))
    proj = DressingProjections.from_unet(unet) if additive else None
    x = torch.randn(2, 12, layer.dim, generator=torch.Generator().manual_seed(7))
    outs = []
    for fine_pool in (1, pool):
        dresser = _dress_layer(unet, layer, feats, proj, strength=1.3, weights=[1.0, 0.5], fine_pool=fine_pool)
        with torch.no_grad(), dresser:
            outs.append(layer.attn(x))
    assert (outs[0] - layer.attn(x)).abs().max() > 1e-3  # the garments do act
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)


def test_only_the_finest_layers_are_pooled(unet, garments):
    with torch.no_grad():
        feats = GarmentsNet(unet, shared=True).extract(garments)
    full = Dresser(unet, feats, None)
    full.prepare()
    pooled = Dresser(unet, feats, None, fine_pool=2)
    pooled.prepare()
    finest = max(full.garment_tokens.values())
    assert finest == garments.shape[0] * garments.shape[2] * garments.shape[3]  # SD1.5 attends at latent size
    for name, n in full.garment_tokens.items():
        assert pooled.garment_tokens[name] == (n // 4 if n == finest else n), name


def test_additive_matches_equation_6(layer_unet):
    unet, layer = layer_unet
    attn, h = layer.attn, layer.attn.heads
    proj, wk, wv = _trained_projections(unet, layer)
    feats = _single_layer_features(layer, 2, 10)
    x = torch.randn(3, 20, layer.dim)
    lam, w = 0.7, [1.0, 0.4]
    with torch.no_grad(), _dress_layer(unet, layer, feats, proj, strength=lam, weights=w):
        got = attn(x)
        f_all = feats.per_layer[layer.name].reshape(1, 20, -1)
        q, k, v = (_heads(attn.to_q(x), h), _heads(attn.to_k(x), h), _heads(attn.to_v(x), h))
        kp = _heads(wk(f_all), h)
        vp = wv(f_all) * torch.tensor([w[0]] * 10 + [w[1]] * 10)[None, :, None]
        vp = _heads(vp, h)
        z = _softmax_attn(q, k, v) + lam * _softmax_attn(q, kp, vp)
        want = attn.to_out(_unheads(z))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_joint_matches_concatenated_attention(layer_unet):
    unet, layer = layer_unet
    attn, h = layer.attn, layer.attn.heads
    feats = _single_layer_features(layer, 2, 6)
    x = torch.randn(2, 12, layer.dim)
    lam, w = 1.5, [1.0, 0.5]
    with torch.no_grad(), _dress_layer(unet, layer, feats, None, strength=lam, weights=w):
        got = attn(x)
        f_all = feats.per_layer[layer.name].reshape(1, 12, -1).expand(2, -1, -1)
        q = _heads(attn.to_q(x), h)
        k = _heads(torch.cat([attn.to_k(x), attn.to_k(f_all)], 1), h)
        v = _heads(torch.cat([attn.to_v(x), attn.to_v(f_all)], 1), h)
        bias = torch.tensor([0.0] * 12 + [math.log(lam * w[0])] * 6 + [math.log(lam * w[1])] * 6)
        want = attn.to_out(_unheads(_softmax_attn(q, k, v, bias)))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _grid_of(n_tokens: int, latent: tuple[int, int]) -> tuple[int, int]:
    """The grid with n_tokens among the latent halved again and again (rounding up, as stride-2 convs do)."""
    h, w = latent
    while h * w != n_tokens:
        assert h * w > n_tokens, f"no level has {n_tokens} tokens"
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w


class A1111Torch:
    """modules/sd_hijack_unet.py TorchHijackForUnet (A1111 82a973c0), which A1111 puts in place of the ldm
    UNet's `th`: a cat that resizes the upsampled half to the skip connection's size, so that image sides
    only need to be multiples of 8, not 64."""

    def __getattr__(self, item):
        return getattr(torch, item)

    def cat(self, tensors, *args, **kwargs):
        if len(tensors) == 2 and tensors[0].shape[-2:] != tensors[1].shape[-2:]:
            tensors = (F.interpolate(tensors[0], tensors[1].shape[-2:], mode="nearest"), tensors[1])
        return torch.cat(tensors, *args, **kwargs)


@pytest.mark.parametrize("latent", [LATENT, (25, 13)])  # 200x104 px: A1111 allows sizes that do not halve evenly
@pytest.mark.parametrize("additive", [True, False])
def test_region_masks_zero_attention_outside_region(unet, inputs, garments, additive, latent, monkeypatch):
    from ldm.modules.diffusionmodules import openaimodel

    monkeypatch.setattr(openaimodel, "th", A1111Torch())
    _, t, ctx = inputs
    x = torch.randn(2, 4, *latent, generator=torch.Generator().manual_seed(4))
    h, w = latent
    left = torch.zeros(h, w)
    left[:, : w // 2] = 1
    top = torch.zeros(h, w)
    top[: h // 2] = 1
    with torch.no_grad():
        feats = GarmentsNet(unet, shared=True).extract(garments)
    proj = DressingProjections.from_unet(unet) if additive else None
    with Dresser(unet, feats, proj, regions=[left, top], record_attention_mass=True) as dresser:
        run(unet, x, t, ctx)
    assert len(dresser.attention_mass) == len(self_attention_layers(unet))
    for name, mass in dresser.attention_mass.items():
        grid = _grid_of(mass.shape[1], latent)
        for k, region in enumerate([left, top]):
            inside = F.interpolate(region[None, None], size=grid, mode="area")[0, 0].flatten() > 0.5
            assert torch.all(mass[:, ~inside, k] == 0), f"{name}: garment {k} attended outside its region"
            if additive and inside.any():
                assert mass[:, inside, k].sum() > 0
        if additive:  # eq. 6's softmax is over garment tokens only: mass sums to 1 wherever a region allows
            both_out = mass.sum(-1) == 0
            torch.testing.assert_close(mass.sum(-1)[~both_out], torch.ones_like(mass.sum(-1)[~both_out]))


@pytest.mark.parametrize("additive", [True, False])
def test_a_zero_weight_garment_among_others_is_as_if_it_were_not_given(unet, inputs, garments, additive):
    x, t, ctx = inputs
    with torch.no_grad():
        both = GarmentsNet(unet, shared=True).extract(garments)
        first = GarmentsNet(unet, shared=True).extract(garments[:1])
    proj = DressingProjections.from_unet(unet) if additive else None
    with Dresser(unet, both, proj, strength=0.8, weights=[1.3, 0.0]):
        dropped = run(unet, x, t, ctx)
    with Dresser(unet, first, proj, strength=0.8, weights=[1.3]):
        alone = run(unet, x, t, ctx)
    with Dresser(unet, both, proj, strength=0.8, weights=[1.3, 0.5]):
        kept = run(unet, x, t, ctx)
    torch.testing.assert_close(dropped, alone, atol=1e-5, rtol=1e-5)
    assert (kept - alone).abs().max() > 1e-4  # the second garment does act when its weight is not 0


def test_query_outside_every_region_gets_no_garment_term(unet, inputs, garments):
    x, t, ctx = inputs
    layer = self_attention_layers(unet)[0]
    nothing = torch.zeros(*LATENT)
    with torch.no_grad():
        feats = GarmentsNet(unet, shared=True).extract(garments)
    tokens = torch.randn(1, LATENT[0] * LATENT[1], layer.dim)
    with torch.no_grad(), Dresser(unet, feats, DressingProjections.from_unet(unet), regions=[nothing, nothing]):
        run(unet, x, t, ctx)  # records the latent size
        dressed = layer.attn(tokens)
    plain = layer.attn(tokens)
    assert torch.isfinite(dressed).all()
    torch.testing.assert_close(dressed, plain, atol=1e-6, rtol=0)


# Batch layouts A1111 produces: (rows, conditional rows)
LAYOUTS = {
    "cond_then_uncond": (2, [0]),
    "uncond_then_cond": (2, [1]),
    "and_prompt_two_conds": (3, [0, 1]),
    "batch_of_two_images": (4, [0, 1]),
    "uncond_only_call": (1, []),  # batch_cond_uncond off: the uncond pass runs alone
    "skip_uncond": (1, [0]),
}


@pytest.mark.parametrize("additive", [True, False])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_unconditional_rows_untouched(unet, garments, additive, layout):
    n, cond = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(n, 4, *LATENT, generator=gen)
    t = torch.full((n,), 500.0)
    ctx = torch.randn(n, 7, 768, generator=gen)
    plain = run(unet, x, t, ctx)
    with torch.no_grad():
        feats = GarmentsNet(unet, shared=True, tap="attn_input").extract(garments)
    proj = DressingProjections.from_unet(unet) if additive else None
    with Dresser(unet, feats, proj, strength=1.0) as dresser:
        dresser.cond_rows = cond
        dressed = run(unet, x, t, ctx)
    uncond = [i for i in range(n) if i not in cond]
    if additive:
        assert torch.equal(dressed[uncond], plain[uncond])  # the frozen path runs on the whole batch
    else:
        torch.testing.assert_close(dressed[uncond], plain[uncond], atol=1e-5, rtol=1e-5)
    for i in cond:
        assert (dressed[i] - plain[i]).abs().max() > 1e-3


def _a1111_sdp_forward(self, x, context=None, mask=None, **kwargs):
    """Mirrors A1111's scaled_dot_product_attention_forward (sd_hijack_optimizations.py) for a class swap."""
    b, _, inner = x.shape
    h = self.heads
    context = x if context is None else context
    q, k, v = (
        t.view(b, -1, h, inner // h).transpose(1, 2) for t in (self.to_q(x), self.to_k(context), self.to_v(context))
    )
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return self.to_out(out.transpose(1, 2).reshape(b, -1, inner))


@pytest.mark.parametrize("additive", [True, False])
def test_vanilla_and_sdp_forward_agree(unet, inputs, garments, monkeypatch, additive):
    from ldm.modules.attention import CrossAttention

    proj = DressingProjections.from_unet(unet) if additive else None
    with torch.no_grad():
        feats = GarmentsNet(unet, shared=True).extract(garments)
    with Dresser(unet, feats, proj) as dresser:
        dresser.cond_rows = [0]
        vanilla = run(unet, *inputs)
        monkeypatch.setattr(CrossAttention, "forward", _a1111_sdp_forward)  # swapped while installed
        sdp = run(unet, *inputs)
    torch.testing.assert_close(sdp, vanilla, atol=1e-4, rtol=1e-4)
    plain_sdp = run(unet, *inputs)
    assert (sdp - plain_sdp)[0].abs().max() > 1e-3


def test_use_checkpoint_on_and_off_agree(inputs, garments):
    from lib_anydressing.sd.architectures import TINY_UNET
    from lib_anydressing.sd.random_models import build_unet

    outs = []
    for flag in (False, True):
        unet = build_unet(TINY_UNET, use_checkpoint=flag)
        feats = GarmentsNet(unet, shared=True).extract(garments)
        with Dresser(unet, feats, DressingProjections.from_unet(unet).requires_grad_(False)):
            outs.append(run(unet, *inputs))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-6)


def _a1111_timestep_hijack(monkeypatch):
    """A1111 (sd_hijack_unet) casts the timestep embedding to the UNet's dtype; ldm alone does not."""
    import ldm.modules.diffusionmodules.openaimodel as om

    orig = om.timestep_embedding
    monkeypatch.setattr(om, "timestep_embedding", lambda t, *a, **k: orig(t, *a, **k).to(t.dtype))


@pytest.mark.parametrize(
    "dtype",
    [
        torch.bfloat16,
        pytest.param(
            torch.float16,
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CPU torch 2.1 has no float16 matmul"),
        ),
    ],
)
@pytest.mark.parametrize("additive", [True, False])
def test_half_precision_runs(unet, inputs, garments, monkeypatch, dtype, additive):
    """Half-precision activations under autocast, as A1111 runs the UNet.

    On CUDA the weights are half too. On CPU, torch 2.1's group_norm rejects bf16 weights with the
    float32 input ldm's GroupNorm32 gives it, so the weights stay float32 and autocast makes the
    attention inputs bf16: the dtype mix the engine must cope with.
    """
    _a1111_timestep_hijack(monkeypatch)
    device = "cuda" if dtype == torch.float16 else "cpu"
    if device == "cuda":
        unet = unet.to(device, dtype)
        unet.dtype = dtype  # as ldm's use_fp16 does, and A1111 sets for its half UNet
    x, t, ctx = (i.to(device, dtype) for i in inputs)
    h, w = LATENT
    region = torch.ones(h, w)
    region[: h // 2] = 0
    with torch.autocast(device, dtype=dtype):  # as A1111 runs a half UNet
        plain = run(unet, x, t, ctx)
        feats = GarmentsNet(unet, shared=True).extract(garments.to(device), dtype=dtype)
        proj = DressingProjections.from_unet(unet).to(device, dtype) if additive else None
        with Dresser(unet, feats, proj, regions=[region, None]) as dresser:
            dresser.cond_rows = [0]
            out = run(unet, x, t, ctx)
    assert all(f.dtype == dtype for f in feats.per_layer.values())
    assert torch.isfinite(out).all()
    assert (out[0] - plain[0]).abs().max() > 1e-2  # the conditional row is dressed
    torch.testing.assert_close(out[1], plain[1], atol=0.05, rtol=0.05)  # the other is not (bf16 tolerance)


def test_features_follow_target_dtype_and_device(unet, garments):
    feats = GarmentsNet(unet, shared=True).extract(garments, dtype=torch.float16, device="cpu")
    assert {f.dtype for f in feats.per_layer.values()} == {torch.float16}


def test_recorded_attention_mass_is_the_softmax_mass_on_each_garment(unet, inputs, garments):
    """A_k of IGL: softmax(Q K'^T / sqrt(d)) summed over garment k's tokens, averaged over heads."""
    x, t, ctx = inputs
    with torch.no_grad():
        feats = GarmentsNet(unet, shared=True).extract(garments)
    proj = DressingProjections.from_unet(unet)
    layer = self_attention_layers(unet)[0]
    seen = {}
    hook = layer.attn.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    with Dresser(unet, feats, proj, record_attention_mass=True) as dresser:
        run(unet, x, t, ctx)
    hook.remove()
    heads = layer.attn.heads
    with torch.no_grad():
        q = layer.attn.to_q(seen["x"]).unflatten(-1, (heads, -1)).transpose(1, 2)
        f = feats.per_layer[layer.name]
        k = proj.pair(layer.name)[0](f.reshape(1, -1, f.shape[-1])).unflatten(-1, (heads, -1)).transpose(1, 2)
        probs = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
    expected = probs.unflatten(-1, (garments.shape[0], -1)).sum(-1).mean(1)
    torch.testing.assert_close(dresser.attention_mass[layer.name], expected, atol=1e-5, rtol=1e-5)
