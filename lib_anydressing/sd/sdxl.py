"""SDXL single-file checkpoints outside the WebUI, and SDXL's text conditioning as A1111 computes it.

The file's UNet (sgm's names, which are ldm's) goes into ldm's UNetModel at SDXL's topology
(`random_models.unet_structure`), sized from the tensors; the VAE is the SD one. The two text encoders
become transformers classes: CLIP-L is stored in transformers' layout already; OpenCLIP ViT-bigG is
converted (its fused attention projection split into q, k, v; its text projection transposed into a Linear).

The conditioning follows A1111 1.10.1 (82a973c0, modules/sd_models_xl.py, sd_hijack_clip.py and
sd_hijack_open_clip.py) over sgm's embedders (generative-models 45c443b3, sgm/modules/encoders/modules.py):
the cross-attention context is CLIP-L's penultimate hidden states next to bigG's penultimate ones (bigG's
tokens past the end token padded with 0, CLIP-L's with the end token); the pooled vector is bigG's final
layer-normed end token through its projection, followed by the sinusoidal embeddings (256 per number) of
the original size (height, width), the crop's top-left (0, 0) and the target size (height, width). A1111
gives an all-empty negative prompt zeros for the text parts (`force_zero_embeddings`).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

from ..files.weights import TensorReader
from .architectures import SDXL_UNET, SDCheckpointError

UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
CLIP_L_PREFIX, CLIP_G_PREFIX = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
SDXL_LATENT_SCALE = 0.13025
SIZE_INPUTS = 6  # original size (h, w), crop top-left (y, x), target size (h, w)


def is_sdxl(keys: Any) -> bool:
    return any(k.startswith("conditioner.embedders.") for k in keys)


class SdxlText(nn.Module):
    """Both text encoders and the size inputs: prompts at an image size -> the UNet's `context` and `y`."""

    def __init__(self, clip_l: nn.Module, clip_g: nn.Module, tokenizer: Any, size_width: int = 256) -> None:
        super().__init__()
        self.clip_l, self.clip_g, self.tokenizer, self.size_width = clip_l, clip_g, tokenizer, size_width

    def forward(self, prompts: list[str], size_hw: tuple[int, int], zero_text: bool = False) -> dict[str, Tensor]:
        from ldm.modules.diffusionmodules.util import timestep_embedding

        device = self.clip_l.device
        ids_l = self.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt").input_ids.to(device)  # fmt: skip
        ids_g = ids_l.masked_fill(_after_first_end(ids_l, self.tokenizer.eos_token_id), 0)
        hidden_l = self.clip_l(ids_l, output_hidden_states=True).hidden_states[-2]
        out_g = self.clip_g(ids_g, output_hidden_states=True)
        context = torch.cat([hidden_l, out_g.hidden_states[-2]], dim=-1)
        pooled = out_g.text_embeds
        if zero_text:
            context, pooled = torch.zeros_like(context), torch.zeros_like(pooled)
        h, w = size_hw
        numbers = torch.tensor([h, w, 0, 0, h, w], device=device)
        sizes = timestep_embedding(numbers, self.size_width).flatten().to(pooled.dtype)
        return {"context": context, "y": torch.cat([pooled, sizes.expand(len(prompts), -1)], dim=1)}


def _after_first_end(ids: Tensor, end: int) -> Tensor:
    """True at the positions after each row's first end token (A1111 pads OpenCLIP's tokens there with 0)."""
    is_end = (ids == end).int()
    return (is_end.cumsum(dim=1) - is_end) > 0


def load_sdxl(reader: TensorReader, name: str, tokenizer: Any, dtype: torch.dtype) -> dict[str, Any]:
    """The parts of an SDXL file as modules in `dtype`, filled tensor by tensor (a 7 GB file never sits in
    memory next to its model): unet, vae, text (SdxlText)."""
    from .architectures import build_autoencoder
    from .checkpoint import vae_config
    from .random_models import unet_structure

    shapes = {k: tuple(reader.shape(k)) for k in reader}
    with torch.device("meta"):
        unet = unet_structure(sdxl_unet_config(name, shapes))
    unet = _filled(name, "UNet", unet, reader, UNET_PREFIX, dtype)
    vae_shapes = {k[len(VAE_PREFIX) :]: s for k, s in shapes.items() if k.startswith(VAE_PREFIX)}
    config, embed_dim = vae_config(vae_shapes)
    vae = _filled(name, "VAE", build_autoencoder(config, embed_dim), reader, VAE_PREFIX, dtype, ignore=("loss.",))
    clip_l = _filled(name, "CLIP-L text encoder", _clip_l(name, shapes), reader, CLIP_L_PREFIX, dtype,
                     ignore=("position_ids",))  # fmt: skip
    g_state = openclip_text_state(
        {k[len(CLIP_G_PREFIX) :]: reader.get(k) for k in shapes if k.startswith(CLIP_G_PREFIX)}
    )
    clip_g = _clip_g(name, {k: tuple(v.shape) for k, v in g_state.items()})
    clip_g = _filled(
        name, "OpenCLIP bigG text encoder", clip_g, TensorReader(g_state), "", dtype, ignore=("position_ids",)
    )
    del g_state
    label_in = shapes[UNET_PREFIX + "label_emb.0.0.weight"][1]
    size_width = (label_in - clip_g.config.projection_dim) // SIZE_INPUTS
    text = SdxlText(clip_l, clip_g, tokenizer, size_width)
    return {"unet": unet, "vae": vae, "text": text.eval().requires_grad_(False)}


def sdxl_unet_config(name: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """SDXL's UNet config at the file's widths: channels, levels, blocks per level, transformer depth per level,
    context and pooled widths (heads stay 64 wide: the SDXL family's)."""
    unet = {k[len(UNET_PREFIX) :]: s for k, s in shapes.items() if k.startswith(UNET_PREFIX)}
    for needed in ("input_blocks.0.0.weight", "label_emb.0.0.weight"):
        if needed not in unet:
            raise SDCheckpointError(f"'{name}' lacks {UNET_PREFIX}{needed}: not a complete SDXL checkpoint")
    channels = unet["input_blocks.0.0.weight"][0]
    blocks = 1 + max(int(k.split(".")[1]) for k in unet if k.startswith("input_blocks."))
    downsamples = {int(k.split(".")[1]) for k in unet if re.match(r"input_blocks\.\d+\.0\.op\.weight", k)}
    levels = len(downsamples) + 1
    per_level = (blocks - 1 - len(downsamples)) // levels
    mult, depths = [], []
    for level in range(levels):
        first = 1 + level * (per_level + 1)
        mult.append(unet[f"input_blocks.{first}.0.out_layers.3.weight"][0] // channels)
        blocks_here = {k.split(".")[4] for k in unet if k.startswith(f"input_blocks.{first}.1.transformer_blocks.")}
        depths.append(len(blocks_here))
    to_k = next(s for k, s in unet.items() if k.endswith("attn2.to_k.weight"))
    return {
        **SDXL_UNET,
        "model_channels": channels,
        "num_res_blocks": per_level,
        "channel_mult": mult,
        "transformer_depth": depths,
        "attention_resolutions": [2**level for level, depth in enumerate(depths) if depth],
        "context_dim": to_k[1],
        "adm_in_channels": unet["label_emb.0.0.weight"][1],
    }


def openclip_text_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """OpenCLIP's text tower (token_embedding, positional_embedding, transformer.resblocks.N, ln_final,
    text_projection) in the key layout of transformers' CLIPTextModelWithProjection."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)", key)
        if m:
            layer, rest = f"text_model.encoder.layers.{m.group(1)}.", m.group(2)
            if rest.startswith("attn.in_proj_"):
                for part, chunk in zip("qkv", value.chunk(3, dim=0), strict=True):
                    out[f"{layer}self_attn.{part}_proj.{rest.rsplit('_', 1)[1]}"] = chunk
            else:
                out[layer + _RESBLOCK[rest.rsplit(".", 1)[0]] + "." + rest.rsplit(".", 1)[1]] = value
        elif key in _TOP:
            out[_TOP[key]] = value.t() if key == "text_projection" else value
        elif key.startswith("ln_final."):
            out["text_model.final_layer_norm." + key.split(".", 1)[1]] = value
    return out


_RESBLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}  # fmt: skip
_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "text_projection": "text_projection.weight",
}


def _clip_l(name: str, shapes: dict[str, tuple[int, ...]]) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    s = {k[len(CLIP_L_PREFIX) :]: v for k, v in shapes.items() if k.startswith(CLIP_L_PREFIX)}
    config = CLIPTextConfig(**_text_sizes(name, "CLIP-L", s), hidden_act="quick_gelu")
    with torch.device("meta"):
        return CLIPTextModel(config)


def _clip_g(name: str, shapes: dict[str, tuple[int, ...]]) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    if "text_projection.weight" not in shapes:
        raise SDCheckpointError(f"'{name}' lacks {CLIP_G_PREFIX}text_projection: not a complete SDXL checkpoint")
    sizes = _text_sizes(name, "OpenCLIP bigG", shapes)
    config = CLIPTextConfig(**sizes, hidden_act="gelu", projection_dim=shapes["text_projection.weight"][0])
    with torch.device("meta"):
        return CLIPTextModelWithProjection(config)


def _text_sizes(name: str, what: str, s: dict[str, tuple[int, ...]]) -> dict[str, int]:
    try:
        vocab, hidden = s["text_model.embeddings.token_embedding.weight"]
        return {
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": s["text_model.encoder.layers.0.mlp.fc1.weight"][0],
            "num_hidden_layers": 1 + max(int(k.split(".")[3]) for k in s if k.startswith("text_model.encoder.layers.")),
            "num_attention_heads": max(1, hidden // 64),  # CLIP's and OpenCLIP's text towers: 64-wide heads
            "max_position_embeddings": s["text_model.embeddings.position_embedding.weight"][0],
        }
    except (KeyError, ValueError) as e:
        raise SDCheckpointError(
            f"'{name}': the {what} weights are incomplete ({e}): not a complete SDXL file"
        ) from None


def _filled(
    name: str, what: str, module: nn.Module, reader: TensorReader, prefix: str, dtype: torch.dtype,
    ignore: tuple[str, ...] = (),
) -> nn.Module:  # fmt: skip
    """`module` (possibly on the meta device) in `dtype` on the CPU with the file's tensors under `prefix`."""
    module = module.to_empty(device="cpu").to(dtype)
    own = module.state_dict()
    keys = {k[len(prefix) :] for k in reader if k.startswith(prefix)}
    keys = {k for k in keys if not any(k.startswith(p) or k.endswith(p) for p in ignore)}
    _check(name, what, own, keys, {k: tuple(reader.shape(prefix + k)) for k in keys}, ignore)
    with torch.no_grad():
        for key in keys:
            own[key].copy_(reader.get(prefix + key))
    if hasattr(module, "text_model"):
        positions = module.text_model.embeddings.position_ids
        positions.copy_(torch.arange(positions.shape[1])[None])
    return module.eval().requires_grad_(False)


def _check(
    name: str, what: str, own: dict[str, Tensor], keys: set[str], shapes: dict[str, tuple], ignore: tuple
) -> None:
    missing = sorted(k for k in own if k not in keys and not any(k.endswith(p) for p in ignore))
    unexpected = sorted(keys - set(own))
    wrong = sorted(k for k in keys if k in own and tuple(own[k].shape) != shapes[k])
    if missing or unexpected or wrong:
        raise SDCheckpointError(
            f"'{name}': the {what} weights do not fit an SDXL {what}: {len(missing)} missing {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}, {len(wrong)} of another shape {wrong[:3]}"
        )
