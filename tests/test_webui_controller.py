"""The A1111 adapter on the real ldm UNet, driven the way A1111 drives it.

`FakeP` and `CFGParams` mirror the attributes of A1111 1.10's StableDiffusionProcessing and
CFGDenoiserParams that the adapter touches (the WebUI itself cannot be installed here).
`cfg_step` reproduces CFGDenoiser.forward's batch: conditional rows first (one per AND sub-prompt
of each image), then one unconditional row per image, run in one call, in chunks
(batch_cond_uncond off), as separate cond/uncond calls (prompts of different lengths), or without
the unconditional rows (skip uncond).
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from PIL import Image

from lib_anydressing.engine import (
    AnyDressingModel,
    DressingProjections,
    GarmentsNet,
    ModelInfo,
    save_checkpoint,
)
from lib_anydressing.generation.infotext import pasted
from lib_anydressing.generation.model_files import TRAINING_FREE
from lib_anydressing.generation.options import from_api, from_script_args, script_arg_names
from lib_anydressing.sd.architectures import TINY_VAE, build_autoencoder
from lib_anydressing.sd.random_models import reinitialise
from lib_anydressing.sd.vae import posterior_mean
from lib_anydressing.webui.controller import Controller

from conftest import LATENT

_VAE = build_autoencoder(TINY_VAE, embed_dim=4).eval().requires_grad_(False)
reinitialise(_VAE, seed=3)


class FakeSdModel:
    """The LatentDiffusion surface used: model.diffusion_model, sd_model_hash, the VAE (the real ldm
    AutoencoderKL, tiny, random) and its scale_factor, text conditioning."""

    def __init__(self, unet):
        self.model = type("DiffusionWrapper", (), {})()
        self.model.diffusion_model = unet
        self.sd_model_hash = "abc123"
        self.first_stage_model = _VAE
        self.scale_factor = 0.18215

    def get_learned_conditioning(self, prompts):
        return torch.zeros(len(prompts), 77, 768)


@dataclass
class FakeP:
    sd_model: Any
    cfg_scale: float = 7.0
    extra_network_data: dict = field(default_factory=dict)
    width: int = LATENT[1] * 8
    height: int = LATENT[0] * 8
    extra_generation_params: dict = field(default_factory=dict)
    comments: dict = field(default_factory=dict)
    closed: int = 0

    def comment(self, text):  # as StableDiffusionProcessing.comment
        self.comments[text] = 1

    def close(self):
        self.closed += 1


@dataclass
class CFGParams:  # field names of modules.script_callbacks.CFGDenoiserParams
    x: torch.Tensor
    image_cond: Any
    sigma: torch.Tensor
    sampling_step: int
    total_sampling_steps: int
    text_cond: torch.Tensor
    text_uncond: torch.Tensor
    denoiser: Any = None


class FakeEnv:
    def __init__(self, dirs):
        self.dirs = dirs
        self.refuse = None

    def model_dirs(self):
        return self.dirs

    def offload_garments_net(self):
        return True

    def cache_size(self):
        return 2

    def image_encoder_dir(self):
        return None

    def refusal(self, p):
        return self.refuse

    def device(self):
        return torch.device("cpu")

    def dtype(self, p):
        return torch.float32

    def load_unet(self, p):
        pass

    def autocast(self):
        return contextlib.nullcontext()

    def encode(self, p, images):  # A1111Env.encode without its device handling (tested in test_webui_env)
        return posterior_mean(p.sd_model.first_stage_model, images) * p.sd_model.scale_factor

    def empty_prompt(self, p):
        return p.sd_model.get_learned_conditioning([""])


def _garments():
    top = Image.new("RGBA", (48, 64), (0, 0, 0, 0))
    top.paste((220, 20, 20, 255), (8, 8, 40, 56))
    return [
        {"image": top, "category": "upper", "weight": 1.0, "region": "box", "box": [0, 0, 1, 0.5]},
        {"image": Image.new("RGB", (40, 40), (20, 20, 220)), "category": "lower", "weight": 0.8},
    ]


def _opts(**general):
    return from_api({"enabled": True, "garments": _garments(), **general})


def start(controller, p, opts):
    """What A1111 does before sampling: the script's process, LoRA activation, then process_batch."""
    controller.process(p, opts)
    controller.process_batch(p)


@pytest.fixture
def setup(unet, tmp_path):
    return Controller(FakeEnv([tmp_path])), FakeP(FakeSdModel(unet)), unet


def cfg_step(controller, unet, x, cond, uncond, repeats, step, total, mode):
    """One CFGDenoiser.forward: returns the UNet output for x_in (uncond rows copied when skipped)."""
    batch = len(repeats)
    x_in = torch.cat([x[i : i + 1].repeat(n, 1, 1, 1) for i, n in enumerate(repeats)] + [x])
    c_in = torch.cat([cond, uncond])
    controller.on_cfg_denoiser(CFGParams(x_in, None, None, step, total, cond, uncond))
    t = torch.full((x_in.shape[0],), 500.0)
    with torch.no_grad():
        if mode == "one_call":
            return unet(x_in, t, context=c_in)
        if mode == "chunks":  # batch_cond_uncond off: chunks of `batch` rows, cond and uncond may mix
            return torch.cat([unet(x_in[a : a + batch], t[a : a + batch], context=c_in[a : a + batch])
                              for a in range(0, x_in.shape[0], batch)])  # fmt: skip
        n_cond = cond.shape[0]
        out_c = unet(x_in[:n_cond], t[:n_cond], context=cond)
        if mode == "skip_uncond":
            return torch.cat([out_c, out_c[:batch]])
        return torch.cat([out_c, unet(x_in[n_cond:], t[n_cond:], context=uncond)])  # separate uncond call


def _batch(repeats, seed=9):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(repeats), 4, *LATENT, generator=gen)
    cond = torch.randn(sum(repeats), 7, 768, generator=gen)
    uncond = torch.randn(len(repeats), 7, 768, generator=gen)
    return x, cond, uncond


@pytest.mark.parametrize("mode", ["one_call", "chunks", "separate_uncond", "skip_uncond"])
@pytest.mark.parametrize("repeats", [[1], [1, 1], [2, 1]], ids=["one_image", "two_images", "and_prompt"])
def test_conditional_rows_marked_in_every_layout(setup, mode, repeats):
    controller, p, unet = setup
    x, cond, uncond = _batch(repeats)
    plain = cfg_step(controller, unet, x, cond, uncond, repeats, 0, 10, "one_call")
    start(controller, p, _opts())
    assert not p.comments, p.comments
    session = controller.session
    dressed = cfg_step(controller, unet, x, cond, uncond, repeats, 0, 10, mode)
    controller.finish(unet)
    # reference: the same features and settings, conditional rows named explicitly, one call
    n_cond = sum(repeats)
    reference = session.make_dresser(unet)  # the session's own settings, not installed
    with reference:
        reference.cond_rows = list(range(n_cond))
        want = cfg_step(Controller(FakeEnv([])), unet, x, cond, uncond, repeats, 0, 10, "one_call")
    torch.testing.assert_close(dressed[:n_cond], want[:n_cond], atol=1e-4, rtol=1e-4)
    assert (dressed[:n_cond] - plain[:n_cond]).abs().max() > 1e-3
    if mode != "skip_uncond":  # other call groupings than `plain`'s: float32 GEMM rounding differs by ~2e-5
        torch.testing.assert_close(dressed[n_cond:], plain[n_cond:], atol=1e-4, rtol=1e-4)


def _clean(unet, before):
    after = unet.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not any("forward" in m.__dict__ for m in unet.modules())
    assert not unet._forward_pre_hooks and "_anydressing_dresser" not in unet.__dict__


@pytest.mark.parametrize("ending", ["postprocess", "exception_then_close", "interrupt", "next_process"])
def test_model_clean_after_every_ending(setup, ending):
    controller, p, unet = setup
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    x, cond, uncond = _batch([1])
    plain = cfg_step(controller, unet, x, cond, uncond, [1], 0, 4, "one_call")
    start(controller, p, _opts())
    assert controller.session is not None
    if ending == "postprocess":
        cfg_step(controller, unet, x, cond, uncond, [1], 0, 4, "one_call")
        controller.finish(p.sd_model.model.diffusion_model)
    elif ending == "exception_then_close":  # raised inside a dressed layer: no postprocess, but p.close()
        from lib_anydressing.engine import self_attention_layers

        middle = self_attention_layers(unet)[4].attn.to_v
        handle = middle.register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("out of memory")))
        with pytest.raises(RuntimeError, match="out of memory"):
            cfg_step(controller, unet, x, cond, uncond, [1], 0, 4, "one_call")
        handle.remove()
        p.close()
        assert p.closed == 1  # A1111's own close still runs
    elif ending == "interrupt":  # interrupt/skip: sampling returns early, postprocess and close follow
        cfg_step(controller, unet, x, cond, uncond, [1], 0, 4, "one_call")
        controller.finish(unet)
        p.close()
    else:  # left dressed; the next generation, even with dressing off, cleans up first
        start(controller, FakeP(p.sd_model), from_api({"enabled": False}))
    _clean(unet, before)
    assert torch.equal(cfg_step(controller, unet, x, cond, uncond, [1], 0, 4, "one_call"), plain)


def test_feature_cache_skips_garments_net_on_regeneration(setup):
    controller, p, unet = setup
    calls = []
    handle = unet.time_embed.register_forward_hook(lambda *a: calls.append(1))
    start(controller, p, _opts())
    first = controller.session.prepared
    controller.finish(unet)
    assert len(calls) == 1 and not first.from_cache
    start(controller, FakeP(p.sd_model), _opts())
    assert len(calls) == 1 and controller.session.prepared.from_cache
    again = controller.session.prepared.features.per_layer
    assert again.keys() == first.features.per_layer.keys()
    assert all(torch.equal(again[k], first.features.per_layer[k]) for k in again)
    controller.finish(unet)
    changed = _garments()
    changed[1]["image"] = Image.new("RGB", (40, 40), (20, 220, 20))
    start(controller, FakeP(p.sd_model), from_api({"enabled": True, "garments": changed}))
    assert len(calls) == 2
    handle.remove()
    controller.finish(unet)


def test_hires_pass_reuses_the_features_and_dresses_the_larger_latent(setup, monkeypatch):
    """A1111 runs the hires pass inside the same sample() call: no second process_batch, and no second
    GarmentsNet pass, while the garments (and their regions) act on the upscaled latent."""
    controller, p, unet = setup
    extract = GarmentsNet.extract
    calls = []
    monkeypatch.setattr(GarmentsNet, "extract", lambda *a, **k: calls.append(1) or extract(*a, **k))
    x, cond, uncond = _batch([1])
    big = torch.nn.functional.interpolate(x, scale_factor=2)
    plain = cfg_step(controller, unet, big, cond, uncond, [1], 0, 2, "one_call")
    start(controller, p, _opts())
    cfg_step(controller, unet, x, cond, uncond, [1], 3, 4, "one_call")  # the first pass's last step
    hires = cfg_step(controller, unet, big, cond, uncond, [1], 0, 2, "one_call")  # the second pass
    controller.finish(unet)
    assert len(calls) == 1
    assert (hires[:1] - plain[:1]).abs().max() > 1e-3 and torch.equal(hires[1:], plain[1:])


def test_dressing_range_follows_steps(setup):
    controller, p, unet = setup
    x, cond, uncond = _batch([1])
    plain = [cfg_step(controller, unet, x, cond, uncond, [1], s, 10, "one_call") for s in (2, 7)]
    start(controller, p, _opts(start=0.5, end=1.0))
    early = cfg_step(controller, unet, x, cond, uncond, [1], 2, 10, "one_call")
    late = cfg_step(controller, unet, x, cond, uncond, [1], 7, 10, "one_call")
    controller.finish(unet)
    assert torch.equal(early, plain[0])
    assert (late - plain[1]).abs().max() > 1e-3


def test_infotext_round_trip(setup):
    controller, p, unet = setup
    start(controller, p, _opts(strength=0.6, start=0.1, end=0.9, resolution=384))
    controller.finish(unet)
    params = {k: str(v) for k, v in p.extra_generation_params.items()}
    assert params["AnyDressing model"] == TRAINING_FREE
    values = pasted(params, n_slots=4)
    assert values["enabled"] is True and values["model"] == TRAINING_FREE
    assert (values["strength"], values["start"], values["end"], values["resolution"]) == (0.6, 0.1, 0.9, 384)
    assert (values["slot0_category"], values["slot0_weight"], values["slot0_region"]) == ("upper", 1.0, "box")
    assert (values["slot0_box_y1"], values["slot1_category"], values["slot1_weight"]) == (0.5, "lower", 0.8)
    assert values["slot1_region"] == "none" and "slot2_category" not in values
    assert values["garment_guidance_enabled"] is False and "garment_guidance" not in values
    start(controller, p, _opts(garment_guidance=2.5))
    controller.finish(unet)
    values = pasted({k: str(v) for k, v in p.extra_generation_params.items()}, n_slots=4)
    assert (values["garment_guidance_enabled"], values["garment_guidance"]) == (True, 2.5)
    start(controller, p, _opts(detail=1.5, fine_pool=4))
    controller.finish(unet)
    values = pasted({k: str(v) for k, v in p.extra_generation_params.items()}, n_slots=4)
    assert (values["resolution"], values["detail"], values["fine_pool"]) == (0, 1.5, "4")
    assert pasted({"Steps": "20"}, 4) == {}
    gap = pasted({"AnyDressing model": "x", "AnyDressing garments": "3:hat:ab:0.5:none"}, 4)
    assert gap["slot2_category"] == "hat" and "slot0_category" not in gap  # slot numbers survive gaps


def test_positional_script_args_as_the_ui_sends_them():
    names = script_arg_names(2)
    values = dict.fromkeys(names)
    values.update(
        enabled=True, model=TRAINING_FREE, strength=0.9, start=0.0, end=1.0, resolution=512,
        garment_guidance_enabled=False, garment_guidance=2.5, slot0_image=_garments()[1]["image"],
        slot0_category="dress", slot0_weight=1.2, slot0_region="box", slot0_box_x0=0.1, slot0_box_y0=0.2,
        slot0_box_x1=0.9, slot0_box_y1=0.8, slot1_region="none",
    )  # fmt: skip
    opts = from_script_args([values[n] for n in names], 2)
    assert opts.problems == [] and opts.usable and opts.garment_guidance is None
    assert len(opts.slots) == 1 and opts.slots[0].box == (0.1, 0.2, 0.9, 0.8) and opts.slots[0].weight == 1.2
    assert len(from_script_args([{"enabled": True, "garments": _garments()}], 2).slots) == 2
    short = from_script_args([True, TRAINING_FREE], 2)  # API callers may send fewer values
    assert short.enabled and not short.slots and not short.problems


@pytest.mark.parametrize(
    "case, expected",
    [
        ("bad_option", "garment 1: category 'scarf'"),
        ("bad_base64", "garment 1: the image is not valid base64"),
        ("no_garment", "no garment image was given"),
        ("missing_model", "no AnyDressing model 'gone'"),
        ("sdxl_model", "is for sdxl, but the loaded model is sd15"),
        ("corrupt_model", "not a readable safetensors file"),
        ("refused", "Hypertile"),
        ("tiny_region", "garment 2: its box region is too small to steer the model"),
    ],
)
def test_bad_input_gets_a_message_and_leaves_the_model_untouched(setup, tmp_path, case, expected, caplog):
    controller, p, unet = setup
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    opts = _opts()
    if case == "bad_option":
        opts = from_api({"enabled": True, "garments": [{"image": _garments()[1]["image"], "category": "scarf"}]})
    elif case == "bad_base64":
        opts = from_api({"enabled": True, "garments": [{"image": "not/base64!", "category": "upper"}]})
    elif case == "no_garment":
        opts = from_api({"enabled": True, "garments": [{"image": None}]})
    elif case == "missing_model":
        opts = _opts(model="gone")
    elif case == "sdxl_model":
        proj = DressingProjections.from_unet(unet)
        save_checkpoint(AnyDressingModel(ModelInfo(base="sdxl"), projections=proj), tmp_path / "xl.safetensors")
        opts = _opts(model="xl")
    elif case == "corrupt_model":
        (tmp_path / "broken.safetensors").write_bytes(bytes(64))
        opts = _opts(model="broken")
    elif case == "tiny_region":  # a 2x2 px box covers no token of the grid at half the latent size
        garments = _garments()
        garments[1].update(region="box", box=[0.5, 0.5, 0.5 + 2 / p.width, 0.5 + 2 / p.height])
        opts = from_api({"enabled": True, "garments": garments})
    else:
        controller.env.refuse = "Hypertile tiles the self-attention that AnyDressing needs whole"
    with caplog.at_level("WARNING", logger="anydressing"):
        start(controller, p, opts)
    comments = " | ".join(p.comments)
    assert expected in comments and "generating without dressing" in comments
    assert [r.getMessage() for r in caplog.records] == list(p.comments)  # the console says the same
    assert controller.session is None and list(p.extra_generation_params) == ["AnyDressing problems"]
    params = _a1111_infotext_round_trip(p.extra_generation_params)  # what an API client finds in `info`
    assert params["Steps"] == "20" and params["Sampler"] == "Euler a"  # the entries after it still parse
    assert (
        expected in params["AnyDressing problems"] and "generating without dressing" in params["AnyDressing problems"]
    )
    assert pasted(params, n_slots=4) == {}  # pasting that image's parameters leaves AnyDressing alone
    _clean(unet, before)
    if case == "bad_base64":  # the next generation (an X/Y/Z cell shares the dict) drops the entry
        start(controller, p, _opts())
        assert "AnyDressing problems" not in p.extra_generation_params
        assert "AnyDressing model" in p.extra_generation_params
        controller.finish(unet)


def _a1111_infotext_round_trip(extra: dict[str, str]) -> dict[str, str]:
    """A1111 1.10.1's last infotext line (processing.create_infotext, infotext_utils.quote) parsed back
    as its parse_generation_parameters does (re_param, unquote), restated here."""
    import json
    import re

    def quote(text: str) -> str:
        return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",\n:") else text

    params = {"Steps": 20, **extra, "Sampler": "Euler a", "Seed": 1}
    line = ", ".join(f"{k}: {quote(str(v))}" for k, v in params.items())
    parsed = {}
    for key, value in re.findall(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', line):
        parsed[key] = json.loads(value) if len(value) > 1 and value[0] == value[-1] == '"' else value
    return parsed


def test_checkpoint_model_from_the_models_folder(setup, tmp_path):
    controller, p, unet = setup
    model = AnyDressingModel(ModelInfo(default_strength=0.7), projections=DressingProjections.from_unet(unet))
    save_checkpoint(model, tmp_path / "mine.safetensors")
    start(controller, p, _opts(model="mine"))
    assert not p.comments, p.comments
    assert controller.session.strength == 0.7  # the checkpoint's default when the request gives none
    assert p.extra_generation_params["AnyDressing model"].startswith("mine [")
    controller.finish(unet)


class _AxisOption:  # scripts/xyz_grid.py's AxisOption(label, type, apply, ...)
    def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
        self.label, self.type, self.apply = label, type, apply


def test_xyz_axes_set_strength_and_weights_per_cell(setup):
    import copy
    import types

    from lib_anydressing.generation.options import apply_overrides
    from lib_anydressing.webui import xyz

    grid = types.SimpleNamespace(AxisOption=_AxisOption, axis_options=[])
    xyz.add_axes(grid, 2)
    xyz.add_axes(grid, 2)  # the UI can be rebuilt: no duplicates
    axes = {o.label: o for o in grid.axis_options}
    assert list(axes) == ["[AnyDressing] Strength", "[AnyDressing] Weight 1", "[AnyDressing] Weight 2"]
    controller, p, unet = setup
    cell = copy.copy(p)  # what xyz_grid does per cell
    axes["[AnyDressing] Strength"].apply(cell, "0.4", None)
    axes["[AnyDressing] Weight 2"].apply(cell, 0.25, None)
    opts = _opts()
    apply_overrides(opts, xyz.overrides(cell))
    start(controller, cell, opts)
    assert controller.session.strength == 0.4 and controller.session.prepared.weights == [1.0, 0.25]
    assert cell.extra_generation_params["AnyDressing strength"] == "0.4"
    controller.finish(unet)
    assert xyz.overrides(p) == {}
    gap = from_api({"enabled": True, "garments": [_garments()[0], {"image": None}, _garments()[1]]})
    apply_overrides(gap, {"weight 3": 0.5})  # UI slot 3 holds the second garment: slot 2 is empty
    assert gap.slots[1].weight == 0.5 and gap.slots[0].weight == 1.0 and not gap.problems
    apply_overrides(gap, {"weight 2": 1.0})
    assert "that garment slot is empty" in gap.problems[0]


def test_separate_garments_net_is_built_once_per_model_and_base(setup, tmp_path):
    controller, p, unet = setup
    weights = {k: v.clone() for k, v in unet.state_dict().items() if ".attn2." not in k}
    model = AnyDressingModel(ModelInfo(), projections=DressingProjections.from_unet(unet), garments_net_weights=weights)
    save_checkpoint(model, tmp_path / "own.safetensors")
    start(controller, p, _opts(model="own"))
    assert not p.comments, p.comments
    built = controller._garments_net[1]
    assert built.unet is not unet
    controller.finish(unet)
    changed = _garments()
    changed[0]["image"] = Image.new("RGB", (30, 30), (1, 2, 3))
    start(controller, FakeP(p.sd_model), from_api({"enabled": True, "model": "own", "garments": changed}))
    assert controller._garments_net[1] is built  # new garments, same network
    controller.finish(unet)
    p.sd_model.sd_model_hash = "another-checkpoint"
    start(controller, FakeP(p.sd_model), _opts(model="own"))
    assert controller._garments_net[1] is not built
    controller.finish(unet)


def a1111_cfg_forward(controller, unet, x, cond, uncond, cond_scale, skip_uncond=False):
    """CFGDenoiser.forward of A1111 1.10 for one prompt per image: the callbacks, the skip, the combine."""
    batch = x.shape[0]
    x_in, sigma_in = torch.cat([x, x]), torch.full((2 * batch,), 500.0)
    params = CFGParams(x_in, None, sigma_in, 3, 10, cond, uncond, types.SimpleNamespace(nmask=None))
    controller.on_cfg_denoiser(params)
    x_in, sigma_in, tensor, uncond = params.x, params.sigma, params.text_cond, params.text_uncond
    if skip_uncond:
        x_in, sigma_in = x_in[:-batch], sigma_in[:-batch]
    cond_in = tensor if skip_uncond else torch.cat([tensor, uncond])
    with torch.no_grad():
        x_out = unet(x_in, sigma_in, context=cond_in)
    controller.on_cfg_denoised(types.SimpleNamespace(x=x_out, sampling_step=3, total_sampling_steps=10))
    if skip_uncond:
        x_out = torch.cat([x_out, x_out[:batch]])
    denoised = x_out[-batch:] + (x_out[:batch] - x_out[-batch:]) * cond_scale
    after = types.SimpleNamespace(x=denoised, sampling_step=3, total_sampling_steps=10)
    controller.on_cfg_after_cfg(after)
    return after.x


def test_garment_guidance_gives_magicclothing_joint_guidance(setup):
    controller, p, unet = setup
    p.cfg_scale, garment_scale = 6.0, 2.5
    x, cond, uncond = _batch([1, 1])
    start(controller, p, _opts(garment_guidance=garment_scale))
    assert not p.comments, p.comments
    got = a1111_cfg_forward(controller, unet, x, cond, uncond, p.cfg_scale)
    session = controller.session
    controller.finish(unet)
    # the three predictions MagicClothing combines, computed row by row with explicit garments
    reference = session.make_dresser(unet)  # the session's own settings, not installed
    t = torch.full((2,), 500.0)
    with torch.no_grad():
        plain_uncond = unet(x, t, context=uncond)
        with reference:
            text = unet(x, t, context=cond)
            garments_only = unet(x, t, context=uncond)
    want = plain_uncond + p.cfg_scale * (text - garments_only) + garment_scale * (garments_only - plain_uncond)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)
    # without garment guidance the same step is A1111's own combine, dressed
    start(controller, FakeP(p.sd_model), _opts())
    plain = a1111_cfg_forward(controller, unet, x, cond, uncond, p.cfg_scale)
    controller.finish(unet)
    torch.testing.assert_close(plain, plain_uncond + p.cfg_scale * (text - plain_uncond), atol=1e-3, rtol=1e-4)


def test_garment_guidance_steps_aside_when_uncond_is_skipped(setup):
    controller, p, unet = setup
    p.cfg_scale = 6.0
    x, cond, uncond = _batch([1])
    start(controller, p, _opts(garment_guidance=2.5))
    skipped = a1111_cfg_forward(controller, unet, x, cond, uncond, p.cfg_scale, skip_uncond=True)
    controller.finish(unet)
    start(controller, FakeP(p.sd_model), _opts())
    plain = a1111_cfg_forward(controller, unet, x, cond, uncond, p.cfg_scale, skip_uncond=True)
    controller.finish(unet)
    torch.testing.assert_close(skipped, plain, atol=1e-4, rtol=1e-4)  # no correction without a real uncond


def test_features_follow_the_loras_a1111_activates_per_batch(setup):
    """Extraction waits for process_batch, after A1111 activated the prompt's LoRAs; a new LoRA set means
    new garment features, the same set in the next batch keeps the installed ones."""
    controller, p, unet = setup
    calls = []
    handle = unet.time_embed.register_forward_hook(lambda *a: calls.append(1))
    controller.process(p, _opts())
    assert controller.session is None and not calls  # nothing extracted before the LoRAs are active
    controller.process_batch(p)
    first = controller.session
    assert first is not None and len(calls) == 1
    controller.process_batch(p)  # the second batch, same networks
    assert controller.session is first and len(calls) == 1
    p.extra_network_data = {"lora": [types.SimpleNamespace(items=["denim_style", "0.8"])]}
    controller.process_batch(p)
    assert controller.session is not first and len(calls) == 2
    handle.remove()
    controller.finish(unet)
