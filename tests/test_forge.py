"""The Forge adapter on the real ldm UNet, driven the way Forge drives attn1 replace patches.

Forge cannot be installed here, so three pieces of it are mirrored from lllyasviel/stable-diffusion-
webui-forge at commit dfdcbab (June 2025, the gradio 4.40 `backend/` version):
- `FakeUnetPatcher`: the signatures and dict handling of backend/patcher/base.py ModelPatcher and
  backend/patcher/unet.py UnetPatcher that the adapter uses (__init__, clone with its deep copy of
  model_options, set_model_patch_replace, set_model_attn1_replace).
- `forge_apply`: what backend/sampling/sampling_function.py calc_cond_uncond_batch puts in
  transformer_options (cond_or_uncond chunks of one row per image, cond_indices, original_shape),
  and how backend/nn/unet.py BasicTransformerBlock runs attn1: the patch under (block, number,
  transformer index), else (block, number), gets to_q/to_k/to_v outputs and extra_options, and its
  result goes through to_out; without a patch, to_q/k/v, backend.attention.attention_function, to_out.
  `calc_cond_uncond_batch` and `cfg_step` mirror the same file's batching (each prompt a chunk of one
  row per image, the batch assembled last entry first) and sampling_function_inner's CFG with its
  post-CFG functions.
- `attention_pytorch`: backend/attention.py's attention_pytorch(q, k, v, heads).
The UNet itself is ldm's (the same module tree Forge's IntegratedUNet2DConditionModel names).
"""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from test_webui_controller import CFGParams, FakeEnv, FakeP, FakeSdModel, _garments, _opts

from lib_anydressing.engine import AnyDressingModel, Dresser, DressingProjections, ModelInfo, save_checkpoint
from lib_anydressing.engine.unet_layers import self_attention_layers
from lib_anydressing.generation.options import from_api
from lib_anydressing.webui import forge
from lib_anydressing.webui.controller import Controller

from conftest import LATENT


def attention_pytorch(q, k, v, heads, mask=None):
    b, _, inner = q.shape
    q, k, v = (t.view(b, -1, heads, inner // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, -1, inner)


class FakeUnetPatcher:
    def __init__(self, model, load_device, offload_device, size=0, current_device=None):
        self.model, self.load_device, self.offload_device, self.size = model, load_device, offload_device, size
        self.current_device = current_device or offload_device
        self.model_options = {"transformer_options": {}}

    def clone(self):
        n = FakeUnetPatcher(self.model, self.load_device, self.offload_device, self.size, self.current_device)
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def set_model_patch_replace(self, patch, name, block_name, number, transformer_index=None):
        to = self.model_options["transformer_options"].copy()
        to["patches_replace"] = dict(to.get("patches_replace", {}))
        to["patches_replace"][name] = dict(to["patches_replace"].get(name, {}))
        block = (block_name, number) if transformer_index is None else (block_name, number, transformer_index)
        to["patches_replace"][name][block] = patch
        self.model_options["transformer_options"] = to

    def set_model_attn1_replace(self, patch, block_name, number, transformer_index=None):
        self.set_model_patch_replace(patch, "attn1", block_name, number, transformer_index)

    def set_model_sampler_post_cfg_function(self, post_cfg_function, disable_cfg1_optimization=False):
        functions = self.model_options.get("sampler_post_cfg_function", [])
        self.model_options["sampler_post_cfg_function"] = [*functions, post_cfg_function]


class ForgeObjects:  # backend/diffusion_engine/base.py: the unet/clip/vae/clipvision holder
    def __init__(self, unet):
        self.unet, self.clip, self.vae, self.clipvision = unet, None, None, None


class ForgeSdModel(FakeSdModel):
    """A ForgeDiffusionEngine for SD1.5: forge_objects, no `.model` wrapper."""

    def __init__(self, unet):
        super().__init__(unet)
        del self.model
        k_model = types.SimpleNamespace(diffusion_model=unet, computation_dtype=torch.float32)
        self.forge_objects = ForgeObjects(FakeUnetPatcher(k_model, "cpu", "cpu"))
        self.is_sd1, self.is_sd2, self.is_sdxl = True, False, False


class ForgeEnv(FakeEnv):
    def __init__(self, dirs):
        super().__init__(dirs)
        self.loaded = []

    def load_unet(self, p):  # Forge's memory manager loads (and merges the LoRAs of) this patcher
        self.loaded.append(p.sd_model.forge_objects.unet)


def forge_keys(unet):
    """attn1 module -> Forge's key, numbered by walking the blocks as Forge's UNet forward does."""
    keys = {}
    groups = [("input", list(unet.input_blocks)), ("middle", [unet.middle_block]), ("output", list(unet.output_blocks))]
    for group, blocks in groups:
        for number, block in enumerate(blocks):
            for layer in block:
                for index, transformer in enumerate(getattr(layer, "transformer_blocks", [])):
                    keys[transformer.attn1] = (group, number, index)
    return keys


def forge_apply(patcher, x, t, context, cond_or_uncond, mask_hook=None):
    """One UNet call as calc_cond_uncond_batch makes it: chunks of x.shape[0] / len(cond_or_uncond) rows."""
    rows = x.shape[0] // len(cond_or_uncond)
    options = dict(patcher.model_options["transformer_options"])
    options["cond_or_uncond"] = list(cond_or_uncond)
    options["cond_indices"] = [i * rows + j for i, c in enumerate(cond_or_uncond) if c == 0 for j in range(rows)]
    options["uncond_indices"] = [i * rows + j for i, c in enumerate(cond_or_uncond) if c == 1 for j in range(rows)]
    options["original_shape"] = list(x.shape)
    replace = options.get("patches_replace", {}).get("attn1", {})
    extra = {k: v for k, v in options.items() if k not in ("patches", "patches_replace")}
    unet = patcher.model.diffusion_model
    keys = forge_keys(unet)
    for attn, key in keys.items():
        patch = replace.get(key, replace.get(key[:2]))

        def forward(n, context=None, mask=None, attn=attn, key=key, patch=patch):
            q, k, v = attn.to_q(n), attn.to_k(n), attn.to_v(n)
            if patch is None:
                return attn.to_out(attention_pytorch(q, k, v, attn.heads))
            info = {**extra, "block": key[:2], "block_index": key[2], "n_heads": attn.heads}
            return attn.to_out(patch(q, k, v, {**info, "dim_head": q.shape[-1] // attn.heads}))

        attn.forward = forward
    try:
        with torch.no_grad():
            return unet(x, t, context=context)
    finally:
        for attn in keys:
            del attn.forward


def calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options):
    """(cond prediction, uncond prediction): here each prompt is a context tensor with a row per image."""
    entries = [(c, 0) for c in cond] + [(u, 1) for u in uncond or []]
    entries.reverse()
    chunks = len(entries)
    patcher = types.SimpleNamespace(model=model, model_options=model_options)
    out = forge_apply(
        patcher, x_in.repeat(chunks, 1, 1, 1), timestep.repeat(chunks), torch.cat([c for c, _ in entries]),
        [kind for _, kind in entries],
    ).chunk(chunks)  # fmt: skip
    cond_out = [o for o, (_, kind) in zip(out, entries, strict=True) if kind == 0]
    uncond_out = [o for o, (_, kind) in zip(out, entries, strict=True) if kind == 1]
    mean = lambda outs: sum(outs) / len(outs) if outs else torch.zeros_like(x_in)  # noqa: E731
    return mean(cond_out), mean(uncond_out)


def cfg_step(patcher, x, t, cond, uncond, cond_scale):
    """sampling_function_inner: CFG (no uncond pass at scale 1), then the post-CFG functions."""
    options = patcher.model_options
    uncond_ = None if cond_scale == 1 else uncond
    cond_pred, uncond_pred = calc_cond_uncond_batch(patcher.model, cond, uncond_, x, t, options)
    result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in options.get("sampler_post_cfg_function", []):
        args = {"denoised": result, "cond": cond, "uncond": uncond, "model": patcher.model}
        args.update(uncond_denoised=uncond_pred, cond_denoised=cond_pred, sigma=t, model_options=options, input=x)
        result = fn(args)
    return result


@pytest.fixture(autouse=True)
def forge_backend(monkeypatch):
    """`backend.attention` and `backend.sampling.sampling_function` as the adapter imports them."""
    modules = {name: types.ModuleType(name) for name in ("backend", "backend.attention", "backend.sampling")}
    modules["backend.sampling.sampling_function"] = types.ModuleType("backend.sampling.sampling_function")
    modules["backend.attention"].attention_function = attention_pytorch
    modules["backend.sampling.sampling_function"].calc_cond_uncond_batch = calc_cond_uncond_batch
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)


@pytest.fixture
def setup(unet, tmp_path):
    p = FakeP(ForgeSdModel(unet))
    return Controller(ForgeEnv([tmp_path])), p, unet, p.sd_model.forge_objects.unet


def _batch(chunks, images=2, seed=5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(images * chunks, 4, *LATENT, generator=gen)
    return x, torch.full((x.shape[0],), 600.0), torch.randn(x.shape[0], 7, 768, generator=gen)


def _rows(cond_or_uncond, images=2):
    return [i * images + j for i, c in enumerate(cond_or_uncond) if c == 0 for j in range(images)]


def _uncond_rows(cond_or_uncond, images=2):
    return [i * images + j for i, c in enumerate(cond_or_uncond) if c == 1 for j in range(images)]


def _additive_model(unet, tmp_path):
    model = AnyDressingModel(ModelInfo(default_strength=0.7), projections=DressingProjections.from_unet(unet))
    save_checkpoint(model, tmp_path / "mine.safetensors")
    return "mine"


def test_forge_keys_of_every_layer(unet):
    keys = forge_keys(unet)
    layers = self_attention_layers(unet)
    assert len(layers) == len(keys) == 10
    assert all(forge.forge_block(layer.name) == keys[layer.attn] for layer in layers)
    assert forge.forge_block("middle_block.1.transformer_blocks.3") == ("middle", 0, 3)  # SDXL depth
    assert forge.forge_block("output_blocks.11.1.transformer_blocks.9") == ("output", 11, 9)


@pytest.mark.parametrize("additive", [False, True], ids=["training_free", "additive"])
@pytest.mark.parametrize(
    "cond_or_uncond", [[1, 0], [0, 0, 1], [0]], ids=["uncond_first", "and_prompt_cond_first", "cond_only"]
)
def test_forge_dressing_equals_the_a1111_path(setup, tmp_path, additive, cond_or_uncond):
    controller, p, unet, user = setup
    x, t, context = _batch(len(cond_or_uncond))
    plain = forge_apply(user, x, t, context, cond_or_uncond)
    controller.process(p, _opts(model=_additive_model(unet, tmp_path)) if additive else _opts())
    controller.before_sampling(p)
    assert not p.comments, p.comments
    clone = p.sd_model.forge_objects.unet
    assert clone is not user and controller.env.loaded == [clone]  # loaded as the patcher that samples
    dressed = forge_apply(clone, x, t, context, cond_or_uncond)
    session = controller.session
    controller.finish(unet)
    reference = session.make_dresser(unet)  # the session's own settings, not installed
    with reference, torch.no_grad():  # the A1111 path: forward patches on the ldm modules, ldm's attention
        reference.cond_rows = _rows(cond_or_uncond)
        want = unet(x, t, context=context)
    cond, uncond = _rows(cond_or_uncond), _uncond_rows(cond_or_uncond)
    # Forge's attention and ldm's sum in other orders: float32 rounding reaches 1.2e-5 (seen on 2 threads);
    # a wrong garment term moves the output by more than 1e-3 (next line)
    torch.testing.assert_close(dressed[cond], want[cond], atol=1e-4, rtol=1e-4)
    assert (dressed[cond] - plain[cond]).abs().max() > 1e-3
    assert torch.equal(dressed[uncond], plain[uncond])
    assert p.sd_model.forge_objects.unet is user


def _theirs(calls):
    """Another extension's attn1 replace patch (a StyleAlign-like change of the keys)."""

    def patch(q, k, v, extra_options):
        calls.append(extra_options["block"])
        return attention_pytorch(q, k * 1.5, v, extra_options["n_heads"]) * 0.9

    return patch


@pytest.mark.parametrize("additive", [False, True], ids=["training_free", "additive"])
def test_another_extensions_replace_patch_is_still_applied(setup, tmp_path, additive):
    controller, p, unet, user = setup
    calls = []
    user.set_model_attn1_replace(_theirs(calls), "middle", 0, 0)
    user.set_model_patch_replace(_theirs(calls), "attn1", "input", 1)  # (block, number): all its transformers
    before = copy.copy(user.model_options["transformer_options"]["patches_replace"]["attn1"])
    layout = [1, 0]
    x, t, context = _batch(2)
    plain = forge_apply(FakeUnetPatcher(user.model, "cpu", "cpu"), x, t, context, layout)
    theirs = forge_apply(user, x, t, context, layout)
    assert (theirs - plain).abs().max() > 1e-3 and sorted(set(calls)) == [("input", 1), ("middle", 0)]
    controller.process(p, _opts(model=_additive_model(unet, tmp_path)) if additive else _opts())
    controller.before_sampling(p)
    clone = p.sd_model.forge_objects.unet
    calls.clear()
    dressed = forge_apply(clone, x, t, context, layout)
    assert sorted(set(calls)) == [("input", 1), ("middle", 0)]
    uncond, cond = _uncond_rows(layout), _rows(layout)
    assert torch.equal(dressed[uncond], theirs[uncond])
    assert (dressed[cond] - theirs[cond]).abs().max() > 1e-3

    # one layer, called directly: their result plus the change the garments make on their own
    patches = clone.model_options["transformer_options"]["patches_replace"]["attn1"]
    alone = FakeUnetPatcher(user.model, "cpu", "cpu")
    forge.add_patches(alone, controller.session.dresser)
    gen = torch.Generator().manual_seed(3)
    attn = self_attention_layers(unet)[3].attn  # the middle block's
    q, k, v = (torch.randn(4, 24, attn.to_q.out_features, generator=gen) for _ in range(3))
    info = {"n_heads": attn.heads, "cond_indices": [2, 3], "original_shape": [4, 4, 6, 4], "block": ("middle", 0)}
    with torch.no_grad():
        got = patches[("middle", 0, 0)](q, k, v, info)
        their_out = _theirs([])(q, k, v, info)
        change = alone.model_options["transformer_options"]["patches_replace"]["attn1"][("middle", 0, 0)](
            q, k, v, info
        ) - attention_pytorch(q, k, v, attn.heads)
    assert torch.equal(got[:2], their_out[:2])
    torch.testing.assert_close(got[2:], their_out[2:] + change[2:], atol=1e-5, rtol=1e-5)
    controller.finish(unet)
    assert user.model_options["transformer_options"]["patches_replace"]["attn1"] == before


def _snapshot(user, unet):
    return copy.copy(user.model_options), {k: v.clone() for k, v in unet.state_dict().items()}


def _untouched(p, user, unet, snapshot):
    options, weights = snapshot
    assert p.sd_model.forge_objects.unet is user
    assert user.model_options == options and user.model_options["transformer_options"] == {}
    after = unet.state_dict()
    assert all(torch.equal(after[k], weights[k]) for k in weights)
    assert not any("forward" in m.__dict__ for m in unet.modules())
    assert not unet._forward_pre_hooks and "_anydressing_dresser" not in unet.__dict__


@pytest.mark.parametrize("ending", ["postprocess", "exception_then_close", "extraction_fails"])
def test_users_patcher_and_model_untouched(setup, ending):
    controller, p, unet, user = setup
    snapshot = _snapshot(user, unet)
    x, t, context = _batch(2)
    plain = forge_apply(user, x, t, context, [1, 0])
    if ending == "extraction_fails":
        controller.env.encode = lambda p, images: (_ for _ in ()).throw(RuntimeError("out of memory"))
    controller.process(p, _opts())
    controller.before_sampling(p)
    if ending == "postprocess":
        forge_apply(p.sd_model.forge_objects.unet, x, t, context, [1, 0])
        controller.finish(forge.unet_of(p))
    elif ending == "exception_then_close":  # raised while sampling: no postprocess, but p.close()
        middle = self_attention_layers(unet)[3].attn.to_v
        handle = middle.register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("interrupted")))
        with pytest.raises(RuntimeError, match="interrupted"):
            forge_apply(p.sd_model.forge_objects.unet, x, t, context, [1, 0])
        handle.remove()
        p.close()
    else:
        assert "out of memory: generating without dressing" in " | ".join(p.comments)
        assert controller.session is None
    _untouched(p, user, unet, snapshot)
    assert torch.equal(forge_apply(p.sd_model.forge_objects.unet, x, t, context, [1, 0]), plain)


def test_hires_pass_gets_a_fresh_clone_and_reuses_features(setup):
    controller, p, unet, user = setup
    snapshot = _snapshot(user, unet)
    calls = []
    handle = unet.time_embed.register_forward_hook(lambda *a: calls.append(1))
    controller.process(p, _opts())
    controller.before_sampling(p)
    first = p.sd_model.forge_objects.unet
    p.sd_model.forge_objects = ForgeObjects(user)  # Forge: forge_objects_after_applying_lora.shallow_copy()
    controller.before_sampling(p)
    second = p.sd_model.forge_objects.unet
    handle.remove()
    assert len(calls) == 1 and second is not first and second is not user
    x, t, context = _batch(2)
    plain = forge_apply(user, x, t, context, [1, 0])
    big = F.interpolate(x, size=(32, 24))  # the second pass samples a larger latent
    hires = forge_apply(second, big, t, context, [1, 0])
    assert hires.shape[-2:] == big.shape[-2:] and torch.isfinite(hires).all()
    assert (forge_apply(second, x, t, context, [1, 0])[2:] - plain[2:]).abs().max() > 1e-3
    controller.finish(forge.unet_of(p))
    _untouched(p, user, unet, snapshot)


def test_dressing_range_on_forge(setup):
    controller, p, unet, user = setup
    x, t, context = _batch(2)
    plain = forge_apply(user, x, t, context, [1, 0])
    controller.process(p, from_api({"enabled": True, "garments": _garments(), "start": 0.5}))
    controller.before_sampling(p)
    clone = p.sd_model.forge_objects.unet
    steps = {}
    for step in (2, 7):  # Forge calls the same cfg_denoiser callback as A1111 before each step
        controller.on_cfg_denoiser(CFGParams(x, None, None, step, 10, context[2:], context[:2]))
        steps[step] = forge_apply(clone, x, t, context, [1, 0])
    controller.finish(unet)
    assert torch.equal(steps[2], plain)
    assert (steps[7][2:] - plain[2:]).abs().max() > 1e-3


def test_garment_guidance_on_forge(setup):
    controller, p, unet, user = setup
    x, t, both = _batch(2)
    x, t, cond, uncond = x[:2], t[:2], both[:2], both[2:]
    w, w_g = 7.0, 3.0
    controller.process(p, _opts(garment_guidance=w_g))
    controller.before_sampling(p)
    assert not p.comments and controller.guidance is None  # not A1111's extra CFG rows
    clone = p.sd_model.forge_objects.unet
    got = cfg_step(clone, x, t, [cond], [uncond], w)
    at_scale_1 = cfg_step(clone, x, t, [cond], [uncond], 1.0)
    session = controller.session
    controller.finish(unet)
    reference = session.make_dresser(unet)  # the session's own settings, not installed
    with torch.no_grad():
        u = unet(x, t, context=uncond)
        with reference:  # A1111's path, every row conditional: text with garments, negative prompt with garments
            text, g = unet(x, t, context=cond), unet(x, t, context=uncond)
    torch.testing.assert_close(got, u + w * (text - g) + w_g * (g - u), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(at_scale_1, text, atol=1e-5, rtol=1e-5)  # no uncond pass: no correction
    assert (got - (u + w * (text - u))).abs().max() > 1e-3


def test_models_without_a_unet_and_quantised_unets_are_refused_on_forge(setup, monkeypatch):
    from lib_anydressing.webui import env

    controller, p, unet, user = setup
    p.sd_model.is_sd1 = False  # Flux / SD3 / Chroma
    shared = types.SimpleNamespace(opts=types.SimpleNamespace(), cmd_opts=types.SimpleNamespace())
    modules = types.ModuleType("modules")
    modules.shared, modules.sd_unet = shared, types.SimpleNamespace(current_unet=None)
    monkeypatch.setitem(sys.modules, "modules", modules)
    assert "is not a UNet" in env.A1111Env().refusal(p)
    p.sd_model.is_sd1 = True
    assert env.A1111Env().refusal(p) is None
    k_model = p.sd_model.forge_objects.unet.model  # backend/modules/k_model.py KModel.storage_dtype
    for storage in ("nf4", "fp4", "gguf"):
        k_model.storage_dtype = storage
        assert f"stored as {storage}" in env.A1111Env().refusal(p)
    for storage in (torch.float16, torch.float8_e4m3fn):  # cast to the computation dtype per call: dressed
        k_model.storage_dtype = storage
        assert env.A1111Env().refusal(p) is None


def test_joint_guidance_turns_the_cfg_result_into_magicclothings():
    """The one formula both WebUIs use, against MagicClothing's u + w (text - g) + w_g (g - u) written out."""
    from lib_anydressing.generation.garment_guidance import joint_guidance

    gen = torch.Generator().manual_seed(3)
    text, garments, uncond, keep = (torch.randn(2, 4, 3, 3, generator=gen) for _ in range(4))
    keep = (keep > 0).float()  # inpainting's nmask: 1 where the image is generated
    w, w_g = 7.0, 2.5
    cfg = uncond + w * (text - uncond)  # what the WebUI's CFG computed
    magicclothing = uncond + w * (text - garments) + w_g * (garments - uncond)
    torch.testing.assert_close(joint_guidance(cfg, garments, uncond, w_g, w), magicclothing)
    masked = joint_guidance(cfg, garments, uncond, w_g, w, keep)
    torch.testing.assert_close(masked, keep * magicclothing + (1 - keep) * cfg)


class ManualCastLinear(torch.nn.Linear):
    """backend/operations.py (dfdcbab) Linear with parameters_manual_cast: weights kept in their storage
    dtype and cast to the input's dtype on every call (weights_manual_cast, target_dtype = x.dtype)."""

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


@pytest.mark.parametrize("storage", [torch.float16, torch.bfloat16])
def test_garment_kv_in_the_compute_dtype_when_forge_stores_weights_in_another(unet, garments, storage):
    """--unet-in-fp16 (or bf16, fp8) on Forge: weights stored narrow, computed in fp32. The garment K/V must
    come out of the same fp32 computation as the UNet's own keys, not out of the storage dtype."""
    from lib_anydressing.engine import GarmentsNet

    with torch.no_grad():
        features = GarmentsNet(unet, shared=True).extract(garments)  # fp32: Forge's computation_dtype
        layers = self_attention_layers(unet)
        for layer in layers:
            for name in ("to_q", "to_k", "to_v"):
                old = getattr(layer.attn, name)
                stored = ManualCastLinear(old.in_features, old.out_features, bias=old.bias is not None)
                stored.load_state_dict(old.state_dict())
                setattr(layer.attn, name, stored.to(storage))
        dresser = Dresser(unet, features, None, strength=1.0)
        prepared = dresser.prepare()
        for name, layer in prepared.items():
            f = features.per_layer[name].reshape(1, -1, features.per_layer[name].shape[-1])
            want = F.linear(f, layer.attn.to_k.weight.float())  # the fp32 computation Forge does
            k = dresser._states[name].k
            assert k.dtype == torch.float32, name
            torch.testing.assert_close(k.transpose(1, 2).reshape(want.shape), want, rtol=1e-6, atol=1e-6)
