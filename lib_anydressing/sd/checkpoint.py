"""An SD1.x model outside the WebUI: UNet, VAE, CLIP text encoder and tokenizer, for training and headless runs.

`load_sd_checkpoint` reads a single-file checkpoint in the original layout the WebUI loads
(model.diffusion_model.*, first_stage_model.*, cond_stage_model.transformer.*) into the real classes
the WebUI runs (ldm UNetModel and AutoencoderKL, transformers CLIPTextModel). Architecture sizes are
read from the tensors' shapes, so the same code loads SD1.5 and the tiny models of the tests.
Nothing is ever downloaded: the tokenizer comes from a folder, the Hugging Face cache the WebUI
filled, or the BPE vocabulary the `clip` / `open_clip` packages ship.
`tiny_stable_diffusion` builds the same classes with tiny configs and seeded random weights.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..files.weights import TensorReader, open_tensors
from .architectures import SD15_UNET, TINY_VAE, SDCheckpointError, build_autoencoder
from .sampling import sd_alphas_cumprod
from .sdxl import SDXL_LATENT_SCALE, is_sdxl, load_sdxl, sdxl_unet_config
from .tokenizer import find_clip_tokenizer, tokenizer_from_folder
from .vae import posterior_moments

# SDXL's text conditioning for prompts at an image size (height, width): the UNet's `context` and pooled `y`
Conditioner = Callable[[list[str], tuple[int, int]], dict[str, Tensor]]

LATENT_SCALE = 0.18215  # SD1.x VAE scaling factor
UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."


@dataclass
class StableDiffusion:
    """The parts of an SD1.x (or SDXL) model that training and sampling need.

    Built by `load_sd_checkpoint`, `tiny_stable_diffusion`, or from the WebUI's loaded model
    (`sd_model.model.diffusion_model`, `sd_model.first_stage_model`,
    `sd_model.cond_stage_model.wrapped.transformer` and its tokenizer). An SDXL model comes with a
    `conditioner` (the WebUI's own, for its two text encoders and size inputs); `text_encoder` is then the
    module that holds them, frozen, and `tokenizer` is unused.
    """

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    prediction: str = "eps"  # "eps" or "v"
    latent_scale: float = LATENT_SCALE
    clip_skip: int = 1  # 1: the last layer (SD1.x default); 2: the penultimate, as the WebUI's setting
    alphas_cumprod: Tensor = field(default_factory=sd_alphas_cumprod)
    conditioner: Conditioner | None = None

    @property
    def is_sdxl(self) -> bool:
        return self.conditioner is not None

    def unet_conditioning(self, prompts: list[str] | Tensor, size_hw: tuple[int, int]) -> dict[str, Tensor]:
        """The UNet's text inputs for prompts (SD1.x: or token ids) at an image size: SD1.x the `context`;
        SDXL also its pooled and size vector `y`."""
        if self.conditioner is None:
            return {"context": self.encode_text(prompts)}
        assert isinstance(prompts, list), "SDXL conditions on prompt strings"
        return self.conditioner(prompts, size_hw)

    def __post_init__(self) -> None:
        if self.prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', not {self.prediction!r}")

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> StableDiffusion:
        for module in self.modules().values():
            module.to(device=device, dtype=dtype)
        return self

    def tokenize(self, prompts: list[str]) -> Tensor:
        """(B, 77) token ids, padded and truncated the way SD1.x was trained."""
        length = self.text_encoder.config.max_position_embeddings
        ids = self.tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        return ids.input_ids

    def encode_text(self, prompts: list[str] | Tensor) -> Tensor:
        """(B, 77, dim) cross-attention context for prompts (or token ids)."""
        ids = self.tokenize(prompts) if isinstance(prompts, list) else prompts
        ids = ids.to(self.text_encoder.device)
        if self.clip_skip <= 1:
            return self.text_encoder(ids).last_hidden_state
        hidden = self.text_encoder(ids, output_hidden_states=True).hidden_states[-self.clip_skip]
        return self.text_encoder.text_model.final_layer_norm(hidden)

    def encode_images(self, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Scaled latents of images in [-1, 1]; a sample of the VAE's posterior when given a generator,
        else its mean."""
        mean, std = posterior_moments(self.vae, pixels.to(self.device, next(self.vae.parameters()).dtype))
        if generator is None:
            return mean * self.latent_scale
        noise = torch.randn(mean.shape, generator=generator, device=generator.device)
        return (mean + std * noise.to(mean)) * self.latent_scale

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Images in [-1, 1] (not clamped) from scaled latents."""
        return self.vae.decode(latents.to(next(self.vae.parameters()).dtype) / self.latent_scale)


def load_sd_checkpoint(
    path: str | Path,
    *,
    tokenizer: Any = None,
    prediction: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> StableDiffusion:
    """An SD1.x single-file checkpoint (.safetensors, or .ckpt/.pth read with weights_only) as a StableDiffusion.

    `tokenizer`: a CLIPTokenizer or a folder holding vocab.json and merges.txt; by default the one the
    WebUI's environment has (see `find_clip_tokenizer`). `prediction`: "eps" or "v"; by default "v" when
    a `<checkpoint>.yaml` beside the file says `parameterization: "v"` (the WebUI's convention), else "eps".
    Raises SDCheckpointError naming the problem (SDXL, SD2, inpainting, not a checkpoint, corrupt).
    """
    path = Path(path)
    reader = open_tensors(path, error=SDCheckpointError, wrappers=("state_dict",))
    if is_sdxl(reader):
        return _sdxl_model(path, reader, tokenizer, prediction, dtype).to(device)
    tensors = {k: reader.get(k) for k in reader}
    del reader
    _check_kind(path.name, tensors)
    parts = {
        prefix: {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        for prefix in (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX)
    }
    text_state = {_text_model_key(k): v for k, v in parts[TEXT_PREFIX].items()}
    del tensors
    unet = _load(path.name, "UNet", _build_unet(parts[UNET_PREFIX]), parts[UNET_PREFIX])
    vae = _load(path.name, "VAE", _build_vae(parts[VAE_PREFIX]), parts[VAE_PREFIX], ignore=("loss.",))
    text_encoder = _build_text_encoder(text_state)
    text_encoder = _load(path.name, "text encoder", text_encoder, text_state, ignore=("position_ids",))
    model = StableDiffusion(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_tokenizer(tokenizer),
        prediction=prediction or _prediction_from_yaml(path),
    )
    vocab = text_encoder.config.vocab_size
    if len(model.tokenizer) > vocab:
        raise SDCheckpointError(f"the tokenizer has {len(model.tokenizer)} tokens, the text encoder only {vocab}")
    return model.to(device, dtype)


def _tokenizer(tokenizer: Any) -> Any:
    """A tokenizer given, or from a folder given, or the one on disk (checked after the weights: a wrong file is
    named before a missing tokenizer)."""
    if isinstance(tokenizer, str | Path):
        return tokenizer_from_folder(Path(tokenizer))
    return tokenizer if tokenizer is not None else find_clip_tokenizer()


def _sdxl_model(
    path: Path, reader: TensorReader, tokenizer: Any, prediction: str | None, dtype: torch.dtype
) -> StableDiffusion:
    sdxl_unet_config(path.name, {k: reader.shape(k) for k in reader})  # a wrong file named before the tokenizer
    tokenizer = _tokenizer(tokenizer)
    parts = load_sdxl(reader, path.name, tokenizer, dtype)
    text = parts["text"]
    if len(tokenizer) > text.clip_l.config.vocab_size:
        raise SDCheckpointError(f"the tokenizer has {len(tokenizer)} tokens, the text encoder only "
                                f"{text.clip_l.config.vocab_size}")  # fmt: skip
    return StableDiffusion(
        unet=parts["unet"], vae=parts["vae"], text_encoder=text, tokenizer=tokenizer,
        prediction=prediction or _prediction_from_yaml(path), latent_scale=SDXL_LATENT_SCALE, conditioner=text,
    )  # fmt: skip


def original_state_dict(model: StableDiffusion) -> dict[str, Tensor]:
    """The model's weights in the original single-file layout (what `load_sd_checkpoint` reads)."""
    out = {UNET_PREFIX + k: v for k, v in model.unet.state_dict().items()}
    out.update({VAE_PREFIX + k: v for k, v in model.vae.state_dict().items()})
    out.update({TEXT_PREFIX + k: v for k, v in model.text_encoder.state_dict().items()})
    return out


# --- checkpoint reading ---------------------------------------------------------------------------------------


def _check_kind(name: str, tensors: dict[str, Tensor]) -> None:
    keys = tensors.keys()
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise SDCheckpointError(f"'{name}' is an SD2.x checkpoint (OpenCLIP text encoder); SD1.x only")
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        hint = "a LoRA" if any("lora_" in k for k in keys) else "not a full Stable Diffusion checkpoint"
        raise SDCheckpointError(f"'{name}' has no UNet (model.diffusion_model.*): {hint}")
    missing = [p for p in (VAE_PREFIX, TEXT_PREFIX) if not any(k.startswith(p) for k in keys)]
    if missing:
        raise SDCheckpointError(f"'{name}' lacks {' and '.join(p + '*' for p in missing)}: not a full SD1.x checkpoint")
    conv_in = tensors.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] != 4:
        kind = "an inpainting" if conv_in.shape[1] == 9 else f"a {conv_in.shape[1]}-channel (e.g. instruct-pix2pix)"
        raise SDCheckpointError(f"'{name}' is {kind} model; train the LoRA on a plain SD1.x checkpoint")


def _text_model_key(key: str) -> str:
    """Old checkpoints name the CLIP weights without transformers' `text_model.` level."""
    return key if key.startswith("text_model.") else "text_model." + key


def _load(name: str, what: str, module: nn.Module, state: dict[str, Tensor], ignore: tuple[str, ...] = ()) -> nn.Module:
    state = {k: v for k, v in state.items() if not any(k.startswith(p) or k.endswith(p) for p in ignore)}
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state and not any(k.endswith(p) for p in ignore))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise SDCheckpointError(
            f"'{name}': the {what} weights do not fit an SD1.x {what}: {len(missing)} missing {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}, {len(wrong)} of another shape {wrong[:3]}"
        )
    module.load_state_dict(state, strict=False)
    return module.eval().requires_grad_(False)


def _need(name: str, state: dict[str, Tensor], key: str) -> Tensor:
    if key not in state:
        raise SDCheckpointError(f"the checkpoint lacks {name}.{key}: not an SD1.x checkpoint, or a corrupt one")
    return state[key]


def _build_unet(state: dict[str, Tensor]) -> nn.Module:
    """An ldm UNetModel sized from the weights."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):  # no random init of weights that are about to be overwritten
        unet = UNetModel(**unet_config({k: tuple(v.shape) for k, v in state.items()}))
    return unet.to_empty(device="cpu")


def unet_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """An SD1.x UNet's ldm config from its encoder's tensor shapes (width, levels, res blocks, attention levels,
    context); a ControlNet's encoder has the same keys."""

    def need(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise SDCheckpointError(f"the checkpoint lacks UNet.{key}: not an SD1.x checkpoint, or a corrupt one")
        return shapes[key]

    channels = need("input_blocks.0.0.weight")[0]
    blocks = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("input_blocks."))
    downsamples = sorted({int(k.split(".")[1]) for k in shapes if re.match(r"input_blocks\.\d+\.0\.op\.weight", k)})
    levels = len(downsamples) + 1
    per_level = (blocks - 1 - len(downsamples)) // levels
    mult, attention = [], []
    for level in range(levels):
        first = 1 + level * (per_level + 1)
        mult.append(need(f"input_blocks.{first}.0.out_layers.3.weight")[0] // channels)
        if f"input_blocks.{first}.1.proj_in.weight" in shapes:
            attention.append(2**level)
    depth = len({k.split(".")[4] for k in shapes if k.startswith("input_blocks.1.1.transformer_blocks.")}) or 1
    to_k = next((v for k, v in shapes.items() if k.endswith("attn2.to_k.weight")), None)
    return {
        **SD15_UNET,
        "model_channels": channels,
        "num_res_blocks": per_level,
        "channel_mult": mult,
        "attention_resolutions": attention,
        "transformer_depth": depth,
        "context_dim": to_k[1] if to_k is not None else SD15_UNET["context_dim"],
    }


def _build_vae(state: dict[str, Tensor]) -> nn.Module:
    config, embed_dim = vae_config({k: tuple(v.shape) for k, v in state.items()})
    return build_autoencoder(config, embed_dim=embed_dim)


def vae_config(shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, Any], int]:
    """(ldm AutoencoderKL config, embed_dim) from the VAE's tensor shapes (SD1.x and SDXL share the layout)."""
    for key in ("encoder.conv_in.weight", "decoder.conv_in.weight", "post_quant_conv.weight"):
        if key not in shapes:
            raise SDCheckpointError(
                f"the checkpoint lacks {VAE_PREFIX}{key}: not a complete checkpoint, or a corrupt one"
            )
    ch = shapes["encoder.conv_in.weight"][0]
    levels = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down."))
    res_blocks = 1 + max(int(k.split(".")[4]) for k in shapes if k.startswith("encoder.down.0.block."))
    mult = [shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in range(levels)]
    z_channels = shapes["decoder.conv_in.weight"][1]
    config = {**TINY_VAE, "ch": ch, "ch_mult": mult, "num_res_blocks": res_blocks, "z_channels": z_channels}
    return config, shapes["post_quant_conv.weight"][1]


def _build_text_encoder(state: dict[str, Tensor]) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab, hidden = _need("text encoder", state, "text_model.embeddings.token_embedding.weight").shape
    positions = _need("text encoder", state, "text_model.embeddings.position_embedding.weight").shape[0]
    layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers."))
    config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_need("text encoder", state, "text_model.encoder.layers.0.mlp.fc1.weight").shape[0],
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),  # CLIP's text towers use 64-wide heads (ViT-L: 12)
        max_position_embeddings=positions,
        hidden_act="quick_gelu",
    )
    with torch.device("meta"):
        model = CLIPTextModel(config)
    model = model.to_empty(device="cpu")
    model.text_model.embeddings.position_ids.copy_(torch.arange(positions)[None])
    return model


def _prediction_from_yaml(path: Path) -> str:
    yaml = path.with_suffix(".yaml")
    if yaml.is_file() and re.search(r"parameterization:\s*['\"]?v['\"]?\s*$", yaml.read_text(errors="replace"), re.M):
        return "v"
    return "eps"
