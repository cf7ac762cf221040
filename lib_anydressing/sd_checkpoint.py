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

import gzip
import importlib.util
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .engine.sd_unet import SD15_UNET, TINY_UNET, build_unet, reinitialise
from .sampling import sd_alphas_cumprod
from .weights_file import WeightsFileError, load_tensors

LATENT_SCALE = 0.18215  # SD1.x VAE scaling factor
UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
CLIP_L_REPO = "openai/clip-vit-large-patch14"  # the tokenizer A1111 loads for SD1.x (from its cache here)
TINY_VAE: dict[str, Any] = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "dropout": 0.0,
}
SD_VAE: dict[str, Any] = {**TINY_VAE, "ch": 128, "num_res_blocks": 2}  # SD1.x's VAE shape
TINY_TEXT: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 1,
    "max_position_embeddings": 77,
}


class SDCheckpointError(WeightsFileError):
    """A checkpoint that cannot be used as an SD1.x model, with a message meant for the user."""


@dataclass
class StableDiffusion:
    """The parts of an SD1.x model that training and sampling need.

    Built by `load_sd_checkpoint`, `tiny_stable_diffusion`, or from the WebUI's loaded model
    (`sd_model.model.diffusion_model`, `sd_model.first_stage_model`,
    `sd_model.cond_stage_model.wrapped.transformer` and its tokenizer).
    """

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    prediction: str = "eps"  # "eps" or "v"
    latent_scale: float = LATENT_SCALE
    clip_skip: int = 1  # 1: the last layer (SD1.x default); 2: the penultimate, as the WebUI's setting
    alphas_cumprod: Tensor = field(default_factory=sd_alphas_cumprod)

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
        posterior = self.vae.encode(pixels.to(self.device, next(self.vae.parameters()).dtype))
        if generator is None:
            return posterior.mean * self.latent_scale
        noise = torch.randn(posterior.mean.shape, generator=generator, device=generator.device)
        return (posterior.mean + posterior.std * noise.to(posterior.mean)) * self.latent_scale

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
    tensors = load_tensors(path, error=SDCheckpointError, wrappers=("state_dict",))
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
    if isinstance(tokenizer, str | Path):
        tokenizer = _tokenizer_from_folder(Path(tokenizer))
    model = StableDiffusion(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer if tokenizer is not None else find_clip_tokenizer(),
        prediction=prediction or _prediction_from_yaml(path),
    )
    vocab = text_encoder.config.vocab_size
    if len(model.tokenizer) > vocab:
        raise SDCheckpointError(f"the tokenizer has {len(model.tokenizer)} tokens, the text encoder only {vocab}")
    return model.to(device, dtype)


def tiny_stable_diffusion(seed: int = 0, *, prediction: str = "eps", **unet_overrides: Any) -> StableDiffusion:
    """The real classes with tiny configs and seeded random weights (tests, benches); no file is read."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_clip_tokenizer()
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_act="quick_gelu", **TINY_TEXT)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config)
    reinitialise(text_encoder, seed=seed + 1)
    vae = build_autoencoder(TINY_VAE, embed_dim=4)
    reinitialise(vae, seed=seed + 2)
    # SD1.5's two res blocks per level: kohya's key names (diffusers block numbers) assume that layout
    overrides = {"context_dim": TINY_TEXT["hidden_size"], "num_res_blocks": 2, **unet_overrides}
    unet = build_unet(TINY_UNET, seed=seed, **overrides)
    model = StableDiffusion(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, prediction=prediction)
    for module in model.modules().values():
        module.eval().requires_grad_(False)
    return model


def original_state_dict(model: StableDiffusion) -> dict[str, Tensor]:
    """The model's weights in the original single-file layout (what `load_sd_checkpoint` reads)."""
    out = {UNET_PREFIX + k: v for k, v in model.unet.state_dict().items()}
    out.update({VAE_PREFIX + k: v for k, v in model.vae.state_dict().items()})
    out.update({TEXT_PREFIX + k: v for k, v in model.text_encoder.state_dict().items()})
    return out


# --- tokenizer ------------------------------------------------------------------------------------------------


def find_clip_tokenizer() -> Any:
    """SD1.x's CLIP tokenizer from what is already on disk, never downloaded.

    Tried in order: the Hugging Face cache (where the WebUI stores openai/clip-vit-large-patch14),
    then the BPE vocabulary shipped inside the `clip` or `open_clip` package.
    """
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(CLIP_L_REPO, local_files_only=True)
    except (OSError, ValueError):
        pass
    for package in ("clip", "open_clip"):
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            bpe = Path(folder) / "bpe_simple_vocab_16e6.txt.gz"
            if bpe.is_file():
                return tokenizer_from_bpe(bpe)
    raise SDCheckpointError(
        "no CLIP tokenizer files were found (nothing is downloaded): pass a folder holding vocab.json and "
        f"merges.txt, e.g. a copy of {CLIP_L_REPO}'s tokenizer files, or run inside the WebUI's environment"
    )


def tokenizer_from_bpe(bpe_gz: Path) -> Any:
    """A CLIPTokenizer from CLIP's own bpe_simple_vocab_16e6.txt.gz (its first line is a header)."""
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    return _tokenizer_from_merges([line for line in lines[1 : 49152 - 256 - 2 + 1] if line])  # CLIP's slice


def tiny_clip_tokenizer() -> Any:
    """A real CLIPTokenizer over the 256 byte symbols and a few merges: small enough for tiny text encoders."""
    return _tokenizer_from_merges(["s h", "sh i", "shi r", "shir t</w>", "d r", "dr e", "dre s", "dres s</w>"])


def _tokenizer_from_merges(merges: list[str]) -> Any:
    """CLIP's vocabulary is defined by its merges: the 256 byte symbols, the same with the end-of-word
    mark, one token per merge in rank order, then <|startoftext|> and <|endoftext|>."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    tokens = [*symbols, *(s + "</w>" for s in symbols), *(m.replace(" ", "") for m in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return _tokenizer_from_folder(folder)


def _tokenizer_from_folder(folder: Path) -> Any:
    from transformers import CLIPTokenizer

    if not (folder / "vocab.json").is_file() or not (folder / "merges.txt").is_file():
        raise SDCheckpointError(f"'{folder}' does not hold a CLIP tokenizer (vocab.json and merges.txt)")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


# --- checkpoint reading ---------------------------------------------------------------------------------------


def _check_kind(name: str, tensors: dict[str, Tensor]) -> None:
    keys = tensors.keys()
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise SDCheckpointError(f"'{name}' is an SDXL checkpoint; garment LoRA training supports SD1.x only")
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
    """An ldm UNetModel sized from the weights (width, levels, res blocks, attention levels, context)."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    channels = _need("UNet", state, "input_blocks.0.0.weight").shape[0]
    blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("input_blocks."))
    downsamples = sorted({int(k.split(".")[1]) for k in state if re.match(r"input_blocks\.\d+\.0\.op\.weight", k)})
    levels = len(downsamples) + 1
    per_level = (blocks - 1 - len(downsamples)) // levels
    mult, attention = [], []
    for level in range(levels):
        first = 1 + level * (per_level + 1)
        mult.append(_need("UNet", state, f"input_blocks.{first}.0.out_layers.3.weight").shape[0] // channels)
        if f"input_blocks.{first}.1.proj_in.weight" in state:
            attention.append(2**level)
    depth = len({k.split(".")[4] for k in state if k.startswith("input_blocks.1.1.transformer_blocks.")}) or 1
    to_k = next((v for k, v in state.items() if k.endswith("attn2.to_k.weight")), None)
    config = {
        **SD15_UNET,
        "model_channels": channels,
        "num_res_blocks": per_level,
        "channel_mult": mult,
        "attention_resolutions": attention,
        "transformer_depth": depth,
        "context_dim": to_k.shape[1] if to_k is not None else SD15_UNET["context_dim"],
    }
    with torch.device("meta"):  # no random init of weights that are about to be overwritten
        unet = UNetModel(**config)
    return unet.to_empty(device="cpu")


def _build_vae(state: dict[str, Tensor]) -> nn.Module:
    ch = _need("VAE", state, "encoder.conv_in.weight").shape[0]
    levels = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.down."))
    res_blocks = 1 + max(int(k.split(".")[4]) for k in state if k.startswith("encoder.down.0.block."))
    mult = [_need("VAE", state, f"encoder.down.{i}.block.0.conv1.weight").shape[0] // ch for i in range(levels)]
    z_channels = _need("VAE", state, "decoder.conv_in.weight").shape[1]
    config = {**TINY_VAE, "ch": ch, "ch_mult": mult, "num_res_blocks": res_blocks, "z_channels": z_channels}
    return build_autoencoder(config, embed_dim=_need("VAE", state, "post_quant_conv.weight").shape[1])


def build_autoencoder(config: dict[str, Any], embed_dim: int) -> nn.Module:
    """An ldm AutoencoderKL of this shape, weights uninitialised (to be loaded or reinitialised)."""
    from ldm.models.autoencoder import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=config, lossconfig={"target": "torch.nn.Identity"}, embed_dim=embed_dim)
    return vae.to_empty(device="cpu")


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
