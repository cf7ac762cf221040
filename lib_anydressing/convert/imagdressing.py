"""IMAGDressing-v1 (`IMAGDressing-v1_512.pt`, a DeepSpeed `module` checkpoint) -> this extension's format.

ref_unet.* is a full diffusers reference UNet run once at t=0; adapter_modules.{i}.to_k_ref/to_v_ref
are the self-attention projections (even i, diffusers processor order), added as
to_out(Attn(Q, K, V) + scale * Attn(Q, W_k' ref, W_v' ref)) with ref the normalised attn1 input.
proj.* is the Resampler that turns CLIP-H image features into the reference UNet's cross-attention
context; it is kept in the file. unet.* is the frozen base UNet, which IMAGDressing's own inference
never loads: not converted.
"""

from __future__ import annotations

from pathlib import Path

from ..engine import AnyDressingModel, ModelInfo
from .common import Conversion, check_widths, garments_net_from_diffusers, projections_from_processors
from .safe_load import ConversionError, load_tensors

LICENSE = "as published by the IMAGDressing authors: check the IMAGDressing-v1 model card before use"
BASE_UNET = "the frozen base UNet: IMAGDressing's inference does not load it"


def convert(paths: list[Path]) -> Conversion:
    if len(paths) != 1 or paths[0].is_dir():
        raise ConversionError("IMAGDressing takes one file: IMAGDressing-v1_512.pt")
    tensors = load_tensors(paths[0])
    groups: dict[str, dict] = {"ref_unet": {}, "adapter_modules": {}, "proj": {}}
    ignored: dict[str, str] = {}
    for key, t in tensors.items():
        prefix, _, rest = key.partition(".")
        if prefix in groups:
            groups[prefix][rest] = t
        elif prefix == "unet":
            ignored[key] = BASE_UNET
        else:
            raise ConversionError(f"{paths[0].name}: unexpected tensor '{key}' (not an IMAGDressing-v1 checkpoint?)")
    for prefix, group in groups.items():
        if not group:
            raise ConversionError(f"{paths[0].name} has no '{prefix}.*' tensors: not an IMAGDressing-v1 checkpoint")
    garments_net = garments_net_from_diffusers(groups["ref_unet"], "ref_unet")
    projections, _ = projections_from_processors(groups["adapter_modules"], "to_k_ref", "to_v_ref", "adapter_modules")
    check_widths(garments_net, projections, "IMAGDressing")
    info = ModelInfo(
        base="sd15",
        tap="attn_input",
        cross_attention="empty_prompt",
        default_strength=1.0,
        resampler_heads=12,  # IMAGDressing's Resampler: dim 768, 12 heads of 64
        origin="IMAGDressing-v1 (muzishen/IMAGDressing)",
        license=LICENSE,
        recommended={"guidance": 7.5, "width": 512, "height": 640, "strength": 1.0, "image_prompt": "CLIP-H"},
    )
    model = AnyDressingModel(
        info, projections=projections, garments_net_weights=garments_net, resampler_weights=groups["proj"]
    )
    used = [k for k in tensors if k not in ignored]
    return Conversion(model, used=used, ignored=ignored)
