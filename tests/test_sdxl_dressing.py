"""Dressing on SDXL's UNet topology: ldm's UNetModel given SDXL's per-level depths and pooled input
(sgm, A1111's SDXL code, cannot be installed from a registry; the live selftest runs the real one)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lib_anydressing.engine import Dresser, DressingProjections, GarmentsNet, self_attention_layers
from lib_anydressing.sd.architectures import SDXL_UNET, TINY_SDXL_UNET
from lib_anydressing.sd.random_models import build_unet, unet_structure

from conftest import LATENT, unet_inputs

GARMENT = (16, 16)


@pytest.fixture(scope="module")
def xl_unet():
    return build_unet(TINY_SDXL_UNET)


@pytest.fixture
def xl_inputs():
    return unet_inputs(TINY_SDXL_UNET["context_dim"], TINY_SDXL_UNET["adm_in_channels"])


def _run(unet, x, t, context, y):
    with torch.no_grad():
        return unet(x, t, context=context, y=y)


def _garments():
    return torch.randn(2, 4, *GARMENT, generator=torch.Generator().manual_seed(2))


def test_full_size_structure_is_sdxls_unet():
    """SDXL base's UNet has 2,567,463,684 parameters (diffusers' UNet2DConditionModel of
    stabilityai/stable-diffusion-xl-base-1.0), 70 self-attention layers (level 1: 5 transformers x 2 blocks,
    640 wide; level 2: 5 x 10 plus the middle's 10, 1280 wide; none at level 0) and a 2816-wide pooled input."""
    with torch.device("meta"):
        unet = unet_structure(SDXL_UNET)
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    widths = [layer.dim for layer in self_attention_layers(unet)]
    assert widths.count(640) == 10 and widths.count(1280) == 60 and len(widths) == 70
    assert unet.state_dict()["label_emb.0.0.weight"].shape == (1280, 2816)
    assert not any(name.startswith(("input_blocks.1.", "input_blocks.2.")) for name, _ in unet.named_modules()
                   if name.endswith("transformer_blocks"))  # fmt: skip


@pytest.mark.parametrize("additive", [True, False])
def test_dressing_changes_the_output_and_removal_restores_it_bit_identically(xl_unet, xl_inputs, additive):
    plain = _run(xl_unet, *xl_inputs)
    before = {k: v.clone() for k, v in xl_unet.state_dict().items()}
    with torch.no_grad():
        features = GarmentsNet(xl_unet, shared=True).extract(_garments())
    proj = DressingProjections.from_unet(xl_unet) if additive else None
    with Dresser(xl_unet, features, proj, strength=0.9, fine_pool=2) as dresser:
        dresser.cond_rows = [0]
        dressed = _run(xl_unet, *xl_inputs)
    assert (dressed[0] - plain[0]).abs().max() > 1e-3
    assert torch.equal(dressed[1], plain[1])  # the unconditional row is the plain UNet's
    assert torch.equal(_run(xl_unet, *xl_inputs), plain)
    after = xl_unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any("forward" in m.__dict__ for m in xl_unet.modules()) and not xl_unet._forward_pre_hooks


def test_features_have_each_layers_grid_and_width(xl_unet):
    """SDXL dresses the grids at 1/2 and 1/4 of the latent only: a 16x16 garment latent gives 8x8 tokens at
    the 640-wide layers (10 of them) and 4x4 at the 1280-wide ones (60), 2 garments each."""
    scale = TINY_SDXL_UNET["model_channels"] / SDXL_UNET["model_channels"]
    with torch.no_grad():
        features = GarmentsNet(xl_unet, shared=True).extract(_garments())
    shapes = [tuple(f.shape) for f in features.per_layer.values()]
    assert shapes.count((2, 64, int(640 * scale))) == 10
    assert shapes.count((2, 16, int(1280 * scale))) == 60
    assert len(shapes) == 70
    assert features.nbytes == 4 * 2 * (10 * 64 * 640 + 60 * 16 * 1280) * scale


def test_two_garments_at_1024_px_take_400_mib_in_fp16():
    """Worked out by hand for the README: one 1024x1024 canvas is a 128x128 latent, so 64x64 = 4096 tokens at
    the 10 layers 640 wide and 32x32 = 1024 at the 60 layers 1280 wide: 104,857,600 values, 200 MiB in fp16,
    per garment. Measured on the full-size structure without allocating it (meta tensors)."""
    with torch.device("meta"):
        unet = unet_structure({**SDXL_UNET, "use_fp16": True}).half()  # ldm casts inputs to fp16 only then
        latents = torch.empty(2, 4, 128, 128, dtype=torch.float16)
    features = GarmentsNet(unet, shared=True).extract(latents)
    assert features.nbytes == 400 * 2**20


@pytest.mark.parametrize("additive", [True, False])
def test_regions_hold_each_garment_to_its_area_at_both_dressed_grids(xl_unet, xl_inputs, additive):
    x, t, ctx, y = xl_inputs
    h, w = LATENT
    left, top = torch.zeros(h, w), torch.zeros(h, w)
    left[:, : w // 2] = 1
    top[: h // 2] = 1
    with torch.no_grad():
        features = GarmentsNet(xl_unet, shared=True).extract(_garments())
    proj = DressingProjections.from_unet(xl_unet) if additive else None
    with Dresser(xl_unet, features, proj, regions=[left, top], record_attention_mass=True) as dresser:
        _run(xl_unet, x, t, ctx, y)
    grids = {(h // 2, w // 2), (h // 4, w // 4)}
    assert {_grid(mass.shape[1]) for mass in dresser.attention_mass.values()} == grids
    for name, mass in dresser.attention_mass.items():
        grid = _grid(mass.shape[1])
        for k, region in enumerate([left, top]):
            inside = F.interpolate(region[None, None], size=grid, mode="area")[0, 0].flatten() > 0.5
            assert torch.all(mass[:, ~inside, k] == 0), f"{name}: garment {k} attended outside its region"
            assert mass[:, inside, k].sum() > 0


def _grid(n_tokens: int) -> tuple[int, int]:
    return next((LATENT[0] // s, LATENT[1] // s) for s in (1, 2, 4, 8) if LATENT[0] * LATENT[1] // s**2 == n_tokens)
