"""Inpainting checkpoints: the real ldm UNet with in_channels=9 (latent, mask, masked-image latent) dressed
and restored bit-identically; what its GarmentsNet pass is given; a 4-channel extractor over it."""

from __future__ import annotations

import torch

from lib_anydressing.engine import AnyDressingModel, Dresser, GarmentsNet, ModelInfo, remove_dressing
from lib_anydressing.sd.architectures import TINY_UNET
from lib_anydressing.sd.random_models import build_unet

from conftest import LATENT, run, unet_inputs


def _inpainting_inputs():
    x, t, context = unet_inputs(TINY_UNET["context_dim"])
    gen = torch.Generator().manual_seed(5)
    mask = (torch.rand(2, 1, *LATENT, generator=gen) > 0.5).float()
    return torch.cat([x, mask, torch.randn(2, 4, *LATENT, generator=gen)], dim=1), t, context


def test_garment_pass_sees_a_whole_known_garment(garments):
    unet = build_unet({**TINY_UNET, "in_channels": 9})
    seen = []
    unet.input_blocks[0][0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        AnyDressingModel.training_free().garments_net(unet).extract(garments)
    (x,) = seen
    assert x.shape == (2, 9, *garments.shape[2:])
    assert torch.equal(x[:, :4], garments) and torch.equal(x[:, 5:], garments)
    assert not x[:, 4].any()  # mask 0: nothing to fill in


def test_inpainting_unet_dressed_and_restored_bit_identically(garments):
    unet = build_unet({**TINY_UNET, "in_channels": 9})
    inputs = _inpainting_inputs()
    plain = run(unet, *inputs)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with torch.no_grad():
        features = AnyDressingModel.training_free().garments_net(unet).extract(garments)
    with Dresser(unet, features, None, strength=1.0):
        dressed = run(unet, *inputs)
    assert (dressed - plain).abs().max() > 1e-3
    assert not remove_dressing(unet)
    assert torch.equal(run(unet, *inputs), plain)
    after = unet.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_four_channel_extractor_over_an_inpainting_unet(garments):
    """AnyDressing's and the peers' GarmentsNets are 4-channel UNets: over a 9-channel model they keep their
    own input conv and give the features they give over the 4-channel model they were made for."""
    weights = {k: v for k, v in build_unet(TINY_UNET, seed=11).state_dict().items() if ".attn2." not in k}
    info = ModelInfo(origin="test", tap="attn_output")
    over_inpainting = AnyDressingModel(info, garments_net_weights=weights).garments_net(
        build_unet({**TINY_UNET, "in_channels": 9})
    )
    over_plain = AnyDressingModel(info, garments_net_weights=weights).garments_net(build_unet(TINY_UNET))
    assert over_inpainting.unet.input_blocks[0][0].in_channels == 4
    with torch.no_grad():
        got, want = over_inpainting.extract(garments), over_plain.extract(garments)
    assert got.per_layer.keys() == want.per_layer.keys()
    assert all(torch.equal(got.per_layer[k], want.per_layer[k]) for k in want.per_layer)
    assert isinstance(over_inpainting, GarmentsNet) and not over_inpainting.shared
