"""Garment LoRA on SDXL, as the WebUI lends it: SDXL's UNet topology (ldm's UNet with sgm's per-level depths
and pooled input), an ldm VAE, and A1111's sgm conditioner behind `get_learned_conditioning`.

sgm cannot be installed from a registry: `A1111SdxlModel` follows what A1111 1.10 (82a973c0) exposes of its
sgm DiffusionEngine to the loan (modules/sd_models_xl.py: `is_sdxl`, `conditioner`, `get_learned_conditioning`
returning {"crossattn": (B, 77, 2048), "vector": (B, 2816)} from a batch that carries width and height,
`scale_factor` 0.13025, `alphas_cumprod`, `parameterization`); the live run in the test beds checks it.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_lora_train import SIDE, _dataset
from torch import nn

from lib_anydressing.garment_lora.kohya_lora import KohyaLoRA
from lib_anydressing.garment_lora.trainer import TrainConfig, train_lora
from lib_anydressing.sd.architectures import TINY_SDXL_UNET, TINY_TEXT, TINY_VAE, build_autoencoder
from lib_anydressing.sd.random_models import build_unet, reinitialise
from lib_anydressing.sd.sampling import sd_alphas_cumprod
from lib_anydressing.training.state import TrainingError
from lib_anydressing.webui.lora_training import ModelSnapshot, lent_model

CONTEXT, POOLED = TINY_SDXL_UNET["context_dim"], TINY_SDXL_UNET["adm_in_channels"]


class SdConditioning(list):
    """A1111's prompt_parser.SdConditioning: the prompts, and the image size they are for."""

    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None):
        super().__init__(prompts)
        self.is_negative_prompt, self.width, self.height = is_negative_prompt, width, height


class TinyConditioner(nn.Module):
    """Stands in for sgm's GeneralConditioner (two CLIP towers and the size embedder): a real tiny
    CLIPTextModel for the per-token context, and the pooled vector made of its pooled output and the size."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        from lib_anydressing.sd.tokenizer import tiny_clip_tokenizer

        self.tokenizer = tiny_clip_tokenizer()
        config = CLIPTextConfig(vocab_size=len(self.tokenizer), hidden_act="quick_gelu", **TINY_TEXT)
        self.text = CLIPTextModel(config)
        reinitialise(self.text, seed=7)
        self.pooled = nn.Linear(TINY_TEXT["hidden_size"] + 2, POOLED)
        self.ucg_rate = 0.1  # A1111's get_learned_conditioning sets the embedders' ucg_rate to 0
        self.sizes_seen: list[tuple[int, int]] = []

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        ids = self.tokenizer(list(batch["txt"]), padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids  # fmt: skip
        out = self.text(ids.to(self.text.device))
        hw = batch["target_size_as_tuple"].float() / 1024
        vector = self.pooled(torch.cat([out.pooler_output, hw.to(out.pooler_output)], dim=1))
        return {"crossattn": out.last_hidden_state, "vector": vector}


class A1111SdxlModel(nn.Module):
    """What the loan reads of A1111's SDXL model (sgm DiffusionEngine, extended by modules/sd_models_xl.py)."""

    is_sdxl, is_sd1 = True, False
    parameterization = "eps"
    scale_factor = 0.13025

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = build_unet(TINY_SDXL_UNET, seed=4)
        vae = build_autoencoder(TINY_VAE, embed_dim=4)
        reinitialise(vae, seed=5)
        self.first_stage_model = vae.eval().requires_grad_(False)
        self.conditioner = TinyConditioner().eval().requires_grad_(False)
        self.alphas_cumprod = sd_alphas_cumprod()

    def get_learned_conditioning(self, batch: list[str]) -> dict[str, torch.Tensor]:
        self.conditioner.ucg_rate = 0.0
        width, height = getattr(batch, "width", 1024), getattr(batch, "height", 1024)
        self.conditioner.sizes_seen.append((height, width))
        sizes = torch.tensor([height, width]).repeat(len(batch), 1)
        return self.conditioner({"txt": batch, "original_size_as_tuple": sizes, "target_size_as_tuple": sizes})


@pytest.fixture(scope="module")
def webui_model():
    return A1111SdxlModel()


def _config(dataset, out, **kw) -> TrainConfig:
    values = {"resolution": SIDE, "rank": 4, "alpha": 4.0, "learning_rate": 1e-2, "epochs": 4, "batch_size": 3}
    return TrainConfig(dataset_dir=dataset, output_dir=out, name="xl_garment", save_every_epochs=0, **{**values, **kw})


def test_a_lent_sdxl_model_trains_a_unet_lora_named_as_kohya_names_sdxl(webui_model, tmp_path):
    dataset = _dataset(tmp_path / "data")
    snapshot = ModelSnapshot.take(webui_model)
    reference = {k: v.clone() for k, v in webui_model.state_dict().items()}
    try:
        model = lent_model(webui_model, clip_skip=2, conditioning_batch=SdConditioning)
        assert model.is_sdxl and model.latent_scale == 0.13025
        result = train_lora(model, _config(dataset, tmp_path / "out"))
    finally:
        snapshot.restore()
    assert result.status == "done", result.message
    assert result.losses[-1] < result.losses[0], result.losses
    assert webui_model.conditioner.sizes_seen[0] == (SIDE, SIDE)  # the size inputs are the training image's
    assert webui_model.conditioner.ucg_rate == 0.1  # what get_learned_conditioning changed is put back
    assert all(torch.equal(reference[k], v) for k, v in webui_model.state_dict().items())
    assert any("SDXL was trained at 64 px" in note for note in result.notes)
    tensors = load_file(str(result.output))
    bases = {k.partition(".")[0] for k in tensors}
    # A1111 1.10's networks.load_network: an SDXL key matches no SD1 rule, then "lora_unet" -> "diffusion_model"
    # is looked up among the model's module names (dots as underscores)
    names = {("diffusion_model." + n).replace(".", "_") for n, _ in webui_model.model.diffusion_model.named_modules()}
    assert all(b.replace("lora_unet", "diffusion_model") in names for b in bases)
    assert all(re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_\d", b) for b in bases)
    assert len(bases) == 70 * 10 + 11 * 2  # per transformer block attn1/attn2 q,k,v,out + 2 ff; proj_in/out each
    with safe_open(str(result.output), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_sdxl_keys_convert_with_diffusers_kohya_rules():
    """diffusers' own loader for kohya SDXL LoRAs (installed: 0.27.2) maps every saved key onto a module of
    a diffusers UNet of the same topology."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.lora_conversion_utils import (
        _convert_kohya_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    state = KohyaLoRA(build_unet(TINY_SDXL_UNET), rank=4, alpha=4, sdxl=True).kohya_state_dict()
    n_modules = len(state) // 3  # down, up, alpha
    config = SimpleNamespace(layers_per_block=TINY_SDXL_UNET["num_res_blocks"])  # what it reads of UNet's config
    converted, alphas = _convert_kohya_lora_to_diffusers(_maybe_map_sgm_blocks_to_diffusers(state, config))
    with torch.device("meta"):
        reference = UNet2DConditionModel(
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64, 128), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=CONTEXT, attention_head_dim=(4, 8, 16), use_linear_projection=True,
        )  # fmt: skip
    names = {name for name, _ in reference.named_modules()}
    paths = set()
    for key in converted:
        path = re.sub(r"\.lora\.(down|up)\.weight$", "", key.removeprefix("unet."))
        path = re.sub(r"\.processor\.(to_[qkv]|to_out)_lora\.(down|up)\.weight$", r".\1", path)
        paths.add(path.replace(".to_out", ".to_out.0"))
    assert len(paths) == n_modules == len(alphas)
    assert paths <= names, sorted(paths - names)[:3]


def test_an_sdxl_text_encoder_lora_is_refused_before_training(webui_model, tmp_path):
    dataset = _dataset(tmp_path / "data")
    model = lent_model(webui_model, clip_skip=1, conditioning_batch=SdConditioning)
    with pytest.raises(TrainingError, match="text-encoder LoRA on SDXL trains headless"):
        train_lora(model, _config(dataset, tmp_path / "out", train_text_encoder=True))
    assert not (tmp_path / "out").exists()


def test_sdxl_text_encoder_keys_convert_with_diffusers_kohya_rules():
    """lora_te1_ / lora_te2_ keys land on diffusers' text_encoder (CLIP-L) and text_encoder_2 (bigG) modules."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_lora_to_diffusers

    from lib_anydressing.sd.random_models import sdxl_shaped

    model = sdxl_shaped(model_channels=32)
    state = KohyaLoRA(model.unet, rank=2, alpha=2, text_encoder=model.text_encoder, sdxl=True).kohya_state_dict()
    te = {k: v for k, v in state.items() if k.startswith("lora_te")}
    assert {k[:9] for k in te} == {"lora_te1_", "lora_te2_"}
    n_modules = len(te) // 3  # down, up, alpha (the conversion empties the dict it is given)
    converted, _ = _convert_kohya_lora_to_diffusers(te)
    encoders = {"text_encoder": model.text_encoder.clip_l, "text_encoder_2": model.text_encoder.clip_g}
    names = {f"{e}.{n}" for e, module in encoders.items() for n, _ in module.named_modules()}
    paths = set()
    for key in converted:  # diffusers 0.27 names: mlp.fc1.lora_linear_layer.*, self_attn.to_q_lora.*
        path = re.sub(r"\.lora_linear_layer\.(down|up)\.weight$", "", key)
        path = re.sub(r"\.to_([qkv])_lora\.(down|up)\.weight$", r".\1_proj", path)
        paths.add(re.sub(r"\.to_out_lora\.(down|up)\.weight$", ".out_proj", path))
    assert len(paths) == n_modules and {p.split(".")[0] for p in paths} == set(encoders)
    assert paths <= names, sorted(paths - names)[:3]
