"""MagicClothing `stable_ckpt` -> this extension's format.

garment_extractor.safetensors is a diffusers UNet run once at t=0 with the empty-prompt embedding;
its loader fills keys the file lacks from the base UNet. ip_layer.pth holds `{i}.to_k_ip.weight` /
`{i}.to_v_ip.weight` for the 16 self-attention processors (even i, diffusers processor order). Its
processor computes to_out(Attn(Q, K, V) + scale * Attn(Q, W_k' ref, W_v' ref)) with ref the
normalised attn1 input of the extractor: the engine's additive Dressing-Attention, scale fixed at 1.
"""

from __future__ import annotations

from pathlib import Path

from ..engine import AnyDressingModel, ModelInfo
from .common import Conversion, check_widths, garments_net_from_diffusers, projections_from_processors
from .safe_load import ConversionError, load_tensors

EXTRACTOR = "garment_extractor.safetensors"
IP_LAYER = "ip_layer.pth"
LICENSE = "CC BY-NC-SA 4.0: non-commercial use only (MagicClothing's weights)"


def find_files(paths: list[Path]) -> tuple[Path, Path]:
    """The extractor and ip_layer files among `paths` (files, or the stable_ckpt folder)."""
    files = [f for p in paths for f in (sorted(p.iterdir()) if p.is_dir() else [p])]
    extractor = next((f for f in files if f.name == EXTRACTOR), None)
    ip_layer = next((f for f in files if f.name == IP_LAYER), None)
    if extractor is None or ip_layer is None:
        raise ConversionError(f"MagicClothing needs both {EXTRACTOR} and {IP_LAYER} (give the stable_ckpt folder)")
    return extractor, ip_layer


def convert(paths: list[Path]) -> Conversion:
    extractor, ip_layer = find_files(paths)
    garments_net = garments_net_from_diffusers(load_tensors(extractor), EXTRACTOR)
    projections, used = projections_from_processors(load_tensors(ip_layer), "to_k_ip", "to_v_ip", IP_LAYER)
    check_widths(garments_net, projections, "MagicClothing")
    info = ModelInfo(
        base="sd15",
        tap="attn_input",
        cross_attention="empty_prompt",
        default_strength=1.0,
        garments_net_partial=True,
        origin="MagicClothing stable_ckpt (ShineChen1024/MagicClothing)",
        license=LICENSE,
        recommended={"guidance": 5.0, "garment_guidance": 2.5, "width": 576, "height": 768, "strength": 1.0},
    )
    model = AnyDressingModel(info, projections=projections, garments_net_weights=garments_net)
    return Conversion(model, used=[f"{EXTRACTOR}:{k}" for k in garments_net] + [f"{IP_LAYER}:{k}" for k in used])
