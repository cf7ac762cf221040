"""Forge: Dressing-Attention through Forge's UnetPatcher instead of patches on the UNet's modules.

Forge (the `backend/` WebUI with gradio 4) runs its own UNet, whose module tree is named like ldm's.
Its BasicTransformerBlock looks attn1 up in model_options["transformer_options"]["patches_replace"]
["attn1"] under (block name, block number, transformer index), then under (block name, block
number); a patch found there receives q, k, v already projected by attn1's to_q/to_k/to_v, (B, T,
inner) each, and extra_options (n_heads, cond_indices, original_shape...), and returns the attention
before to_out. Scripts set such patches on a clone of `p.sd_model.forge_objects.unet` before every
sampling and put the clone in its place; the user's own UnetPatcher is never changed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from ..engine import Dresser
from ..generation.garment_guidance import joint_guidance

ForgeAttention = Callable[[Tensor, Tensor, Tensor, int], Tensor]  # backend.attention.attention_function(q, k, v, heads)
ReplacePatch = Callable[[Tensor, Tensor, Tensor, dict], Tensor]

_GROUPS = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}


def is_forge(p: Any) -> bool:
    return hasattr(p.sd_model, "forge_objects")


def unet_of(p: Any) -> nn.Module:
    """The UNet module that samples: Forge keeps it in its UnetPatcher, A1111 in the LatentDiffusion wrapper."""
    if is_forge(p):
        return p.sd_model.forge_objects.unet.model.diffusion_model
    return p.sd_model.model.diffusion_model


def forge_block(layer_name: str) -> tuple[str, int, int]:
    """Forge's attn1 key for a layer: input_blocks.4.1.transformer_blocks.0 -> ("input", 4, 0).

    Forge numbers input and output blocks as ldm does, the middle block 0, and the transformer
    index is the block's place in its SpatialTransformer.
    """
    parts = layer_name.split(".")
    if parts[0] not in _GROUPS or parts[-2] != "transformer_blocks":
        raise ValueError(f"not a UNet self-attention layer name: {layer_name}")
    number = 0 if parts[0] == "middle_block" else int(parts[1])
    return _GROUPS[parts[0]], number, int(parts[-1])


def add_patches(patcher: Any, dresser: Dresser, attention: ForgeAttention | None = None) -> None:
    """Dressing-Attention as attn1 replace patches on `patcher` (a clone made for this generation).

    A patch another extension already set on a layer is not dropped: ours calls it and adds the
    garments' change to its result.
    """
    attention = attention or _forge_attention()
    options = patcher.model_options.get("transformer_options", {})
    existing = options.get("patches_replace", {}).get("attn1", {})
    for name in dresser.prepare():
        block = forge_block(name)
        previous = existing.get(block, existing.get(block[:2]))
        patcher.set_model_attn1_replace(_replace_patch(dresser, name, previous, attention), *block)


def add_garment_guidance(patcher: Any, scale: float, cfg_scale: float) -> None:
    """MagicClothing's garment guidance as a Forge post-CFG function on `patcher`.

    A1111 gets the garments-only prediction g from rows its CFG callback adds to the batch; Forge
    builds its batch from the prompt composition instead, so g is one more UNet pass here: the
    negative prompt run as a conditional prompt, whose rows the attn1 patches therefore dress. The
    combination is GarmentGuidance's, u + w (text - g) + w_g (g - u) = D + (w_g - w)(g - u), and a
    step Forge ran without the unconditional pass (CFG scale 1) is left alone, as on A1111.
    """
    from backend.sampling.sampling_function import calc_cond_uncond_batch

    def post_cfg(args: dict) -> Tensor:
        uncond_pred = args["uncond_denoised"]
        if args["uncond"] is None or not bool(uncond_pred.any()):
            return args["denoised"]
        garments, _ = calc_cond_uncond_batch(
            args["model"], args["uncond"], None, args["input"], args["sigma"], args["model_options"]
        )
        return joint_guidance(args["denoised"], garments, uncond_pred, scale, cfg_scale)

    patcher.set_model_sampler_post_cfg_function(post_cfg)


def _replace_patch(dresser: Dresser, name: str, previous: ReplacePatch | None, attention: ForgeAttention):
    """A plain function, not an object: Forge deep-copies model_options on every clone()."""

    def patch(q: Tensor, k: Tensor, v: Tensor, extra_options: dict) -> Tensor:
        heads = extra_options["n_heads"]

        def plain(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return attention(q, k, v, heads)

        def theirs(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return previous(q, k, v, extra_options)

        shape = extra_options.get("original_shape")
        return dresser.attend_projected(
            name,
            q,
            k,
            v,
            plain if previous is None else theirs,
            cond_rows=extra_options.get("cond_indices", ()),  # absent: a call that is not CFG sampling
            latent_hw=(int(shape[-2]), int(shape[-1])) if shape else None,
            plain=None if previous is None else plain,
        )

    return patch


def _forge_attention() -> ForgeAttention:
    from backend.attention import attention_function  # the attention Forge selected (pytorch, xformers...)

    return attention_function
