"""A1111Env: the answers the controller gets from the WebUI, with `modules` / `backend` standing in where
they must.

The hosts' VAEs are the real ldm AutoencoderKL, wrapped the way each host's source at a named commit
calls it, so that each host's own encode_first_stage samples the posterior with the global RNG as it does:
- A1111 1.10.1 (82a973c0), SD1.x: ldm LatentDiffusion; get_first_stage_encoding samples a posterior.
- A1111 1.10.1, SDXL: sgm (generative-models 45c443b3) DiffusionEngine.encode_first_stage returns
  scale_factor * first_stage_model.encode(x), and sgm's AutoencoderKLInferenceWrapper.encode returns
  AutoencoderKL.encode(x).sample(); A1111's sd_models_xl makes get_first_stage_encoding the identity.
- Forge (dfdcbab): backend/diffusion_engine/sd15.py and sdxl.py encode_first_stage call
  forge_objects.vae.encode (backend/patcher/vae.py VAE: memory_management.load_models_gpu, pixels in
  [0, 1] moved to 2a - 1 in vae_dtype on vae.device), whose IntegratedAutoencoderKL.encode returns
  DiagonalGaussianDistribution(quant_conv(encoder(x))).sample() (backend/nn/vae.py) and process_in
  (latent - shift_factor) * scaling_factor.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from ldm.models.autoencoder import AutoencoderKL

from lib_anydressing.sd.architectures import TINY_VAE, build_autoencoder
from lib_anydressing.sd.random_models import reinitialise
from lib_anydressing.webui import env

SCALE = 0.18215


def _vae() -> AutoencoderKL:
    vae = build_autoencoder(TINY_VAE, embed_dim=4)
    reinitialise(vae, seed=3)
    return vae


def _a1111_sd15(vae):
    from ldm.models.diffusion.ddpm import LatentDiffusion

    sd_model = types.SimpleNamespace(scale_factor=SCALE, first_stage_model=vae, lowvram=False)
    sd_model.encode_first_stage = vae.encode
    sd_model.get_first_stage_encoding = lambda posterior: LatentDiffusion.get_first_stage_encoding(sd_model, posterior)
    return sd_model


def _a1111_sdxl(vae):
    vae.encode = lambda x: AutoencoderKL.encode(vae, x).sample()  # sgm's AutoencoderKLInferenceWrapper
    sd_model = types.SimpleNamespace(scale_factor=SCALE, first_stage_model=vae, lowvram=False)
    sd_model.encode_first_stage = lambda x: SCALE * vae.encode(x)
    sd_model.get_first_stage_encoding = lambda x: x
    return sd_model


class _ForgeVAE:  # backend/patcher/vae.py VAE, the parts encode uses
    def __init__(self, model):
        self.first_stage_model, self.patcher = model, object()
        self.device, self.vae_dtype = torch.device("cpu"), torch.float32

    def encode(self, pixels):  # encode_inner without tiling; pixels (N, H, W, 3) in [0, 1]
        x = (2.0 * pixels.movedim(-1, 1) - 1.0).to(self.vae_dtype)
        h = self.first_stage_model.quant_conv(self.first_stage_model.encoder(x))
        mean, logvar = torch.chunk(h, 2, dim=1)
        return mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * torch.randn(mean.shape)


def _forge(vae):
    vae.process_in = lambda latent: (latent - 0.0) * SCALE
    forge_vae = _ForgeVAE(vae)
    sd_model = types.SimpleNamespace(forge_objects=types.SimpleNamespace(vae=forge_vae))
    sd_model.encode_first_stage = lambda x: vae.process_in(forge_vae.encode(x.movedim(1, -1) * 0.5 + 0.5)).to(x)
    sd_model.get_first_stage_encoding = lambda x: x
    return sd_model


@pytest.mark.parametrize("host", [_a1111_sd15, _a1111_sdxl, _forge])
def test_garments_encode_to_the_posterior_mean_whatever_the_global_seed(host, monkeypatch):
    """The hosts' encode_first_stage samples the posterior with the global RNG: garments must not."""
    modules = types.ModuleType("modules")
    modules.devices = types.SimpleNamespace(device=torch.device("cpu"), dtype_vae=torch.float32)
    modules.lowvram = types.SimpleNamespace(is_enabled=lambda sd_model: sd_model.lowvram)
    loaded = []
    backend = types.ModuleType("backend")
    backend.memory_management = types.SimpleNamespace(load_model_gpu=loaded.append)
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "backend", backend)
    vae = _vae()
    p = types.SimpleNamespace(sd_model=host(vae))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        torch.manual_seed(1)
        first = env.A1111Env().encode(p, images)
        torch.manual_seed(2)
        second = env.A1111Env().encode(p, images)
        hosts = [p.sd_model.get_first_stage_encoding(p.sd_model.encode_first_stage(images)) for _ in range(2)]
        mean = AutoencoderKL.encode(vae, images).mean
    assert torch.equal(first, second)
    assert not torch.equal(*hosts)  # what the host's own encoding gives: a fresh sample each time
    torch.testing.assert_close(first, SCALE * mean)
    assert loaded == ([p.sd_model.forge_objects.vae.patcher] * 2 if host is _forge else [])


def test_a1111_lowvram_vae_is_brought_to_the_device_and_put_back(monkeypatch):
    moved, sent = [], []
    vae = _vae()
    vae.to = lambda device: moved.append(str(device)) or vae
    modules = types.ModuleType("modules")
    modules.devices = types.SimpleNamespace(device=torch.device("cpu"), dtype_vae=torch.float32)
    modules.lowvram = types.SimpleNamespace(
        is_enabled=lambda m: m.lowvram, send_everything_to_cpu=lambda: sent.append(1)
    )
    monkeypatch.setitem(sys.modules, "modules", modules)
    sd_model = _a1111_sd15(vae)
    sd_model.lowvram = True
    with torch.no_grad():
        env.A1111Env().encode(types.SimpleNamespace(sd_model=sd_model), torch.zeros(1, 3, 32, 32))
    assert sent == [1] and moved == ["cpu", "cpu"]  # to devices.device (cpu here), then back to the CPU
