"""A1111Env: the answers the controller gets from the WebUI, with `modules` standing in where it must."""

from __future__ import annotations

import sys
import types

import torch


def test_garments_encode_to_the_same_latents_whatever_the_global_seed(monkeypatch):
    """A1111's get_first_stage_encoding samples the VAE posterior with the global RNG: garments must not."""
    from ldm.models.diffusion.ddpm import LatentDiffusion

    from lib_anydressing.engine.sd_unet import reinitialise
    from lib_anydressing.sd_checkpoint import TINY_VAE, build_autoencoder
    from lib_anydressing.webui import env

    vae = build_autoencoder(TINY_VAE, embed_dim=4)
    reinitialise(vae, seed=3)
    sd_model = types.SimpleNamespace(scale_factor=0.18215, encode_first_stage=vae.encode)
    sd_model.get_first_stage_encoding = lambda posterior: LatentDiffusion.get_first_stage_encoding(sd_model, posterior)
    modules = types.ModuleType("modules")
    modules.devices = types.SimpleNamespace(device=torch.device("cpu"), dtype_vae=torch.float32)
    monkeypatch.setitem(sys.modules, "modules", modules)
    p = types.SimpleNamespace(sd_model=sd_model)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        torch.manual_seed(1)
        first = env.A1111Env().encode(p, images)
        torch.manual_seed(2)
        second = env.A1111Env().encode(p, images)
        torch.manual_seed(1)
        sampled, resampled = (sd_model.get_first_stage_encoding(vae.encode(images)) for _ in range(2))
    assert torch.equal(first, second)
    assert not torch.equal(sampled, resampled)  # what encoding did before: a fresh sample each time
    torch.testing.assert_close(first, 0.18215 * vae.encode(images).mean)
