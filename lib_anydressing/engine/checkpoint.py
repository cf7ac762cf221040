"""The extension's checkpoint format: one .safetensors file, documented in models/README.md.

Tensors:   garments_net.<ldm UNet key>            GarmentsNet weights (absent: reuses the base UNet)
           gfe.<layer>.<q|k|v>.down / .up         per-slot GFE LoRA, (slots, rank, in) / (slots, out, rank)
           da.<layer>.to_k / .to_v                Dressing-Attention projections W'_k, W'_v, (out, in)
           resampler.*                            image-prompt Resampler feeding GarmentsNet's cross-attention
Metadata:  anydressing.* strings (format version, base architecture, slots, LoRA rank/alpha, tap point,
           cross-attention mode, default strength, origin, license, recommended settings).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .garments_net import CROSS_ATTENTION_MODES, TAP_POINTS, CrossAttentionMode, GarmentsNet, TapPoint
from .gfe_lora import PROJECTIONS, GarmentLoRA
from .projections import DressingProjections
from .unet_layers import architecture, self_attention_layers

FORMAT = "anydressing"
FORMAT_VERSION = 1
_PREFIX = "anydressing."


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with a message meant for the user."""


@dataclass
class ModelInfo:
    """What a checkpoint declares about itself."""

    base: str = "sd15"
    slots: list[str] = field(default_factory=list)
    lora_rank: int = 0
    lora_alpha: float = 0.0
    tap: TapPoint = "attn_output"
    cross_attention: CrossAttentionMode = "skip"
    default_strength: float = 0.7
    garments_net_partial: bool = False  # garments_net.* holds only some keys; the rest are the base UNet's
    resampler_heads: int = 0  # attention heads of resampler.* (not recoverable from its shapes)
    origin: str = "anydressing"
    license: str = ""
    recommended: dict[str, Any] = field(default_factory=dict)

    def to_metadata(self) -> dict[str, str]:
        meta = {_PREFIX + "format": FORMAT, _PREFIX + "format_version": str(FORMAT_VERSION)}
        for key, value in asdict(self).items():
            meta[_PREFIX + key] = value if isinstance(value, str) else json.dumps(value)
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str], where: str) -> ModelInfo:
        if meta.get(_PREFIX + "format") != FORMAT:
            raise CheckpointError(f"{where} is not an AnyDressing checkpoint (no '{_PREFIX}format' metadata)")
        version = int(meta.get(_PREFIX + "format_version", "0"))
        if version > FORMAT_VERSION:
            raise CheckpointError(f"{where} has format version {version}; this extension reads up to {FORMAT_VERSION}")
        values: dict[str, Any] = {}
        for name, default in asdict(cls()).items():
            raw = meta.get(_PREFIX + name)
            if raw is None:
                continue
            try:
                values[name] = raw if isinstance(default, str) else json.loads(raw)
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{where}: metadata '{_PREFIX}{name}' is not valid JSON: {raw!r}") from e
        info = cls(**values)
        for name, allowed in (("tap", TAP_POINTS), ("cross_attention", CROSS_ATTENTION_MODES)):
            if getattr(info, name) not in allowed:
                raise CheckpointError(f"{where}: '{_PREFIX}{name}' is {getattr(info, name)!r}, not one of {allowed}")
        return info


@dataclass
class AnyDressingModel:
    """Everything a checkpoint holds; `projections is None` means training-free (joint) attention."""

    info: ModelInfo
    projections: DressingProjections | None = None
    lora: GarmentLoRA | None = None
    garments_net_weights: dict[str, Tensor] | None = None  # None: GarmentsNet is the running UNet
    resampler_weights: dict[str, Tensor] | None = None  # IMAGDressing's image-prompt Resampler, kept as is

    @classmethod
    def training_free(cls) -> AnyDressingModel:
        """The built-in default: no weights, garment tokens join the UNet's own self-attention."""
        return cls(ModelInfo(origin="training-free", tap="attn_input", default_strength=1.0))

    def check_compatible(self, unet: nn.Module) -> None:
        """Raise CheckpointError naming the mismatch when this model cannot dress `unet`."""
        arch = architecture(unet)
        if self.projections is None and self.lora is None and self.garments_net_weights is None:
            return  # training-free works on any ldm-family UNet
        if arch != self.info.base:
            raise CheckpointError(f"this AnyDressing model is for {self.info.base}, but the loaded model is {arch}")
        for layer in self_attention_layers(unet):
            if self.projections is not None:
                if layer.name not in self.projections.layer_names:
                    raise CheckpointError(f"the model has no Dressing-Attention weights for layer {layer.name}")
                k, _ = self.projections.pair(layer.name)
                if (k.in_features, k.out_features) != (layer.dim, layer.inner_dim):
                    raise CheckpointError(
                        f"layer {layer.name}: Dressing-Attention is {k.in_features}->{k.out_features}, "
                        f"the UNet is {layer.dim}->{layer.inner_dim}"
                    )

    def garments_net(self, unet: nn.Module) -> GarmentsNet:
        """GarmentsNet for dressing `unet`: the UNet itself (shared) or a separate network."""
        self.check_compatible(unet)
        kwargs: dict[str, Any] = {"lora": self.lora, "tap": self.info.tap, "cross_attention": self.info.cross_attention}
        if self.garments_net_weights is None:
            return GarmentsNet(unet, shared=True, **kwargs)
        try:
            return GarmentsNet.from_state_dict(
                unet, self.garments_net_weights, partial=self.info.garments_net_partial, **kwargs
            )
        except ValueError as e:
            raise CheckpointError(str(e)) from e

    def state_dict_for_file(self) -> dict[str, Tensor]:
        tensors: dict[str, Tensor] = {}
        for key, t in (self.garments_net_weights or {}).items():
            tensors[f"garments_net.{key}"] = t
        for key, t in (self.resampler_weights or {}).items():
            tensors[f"resampler.{key}"] = t
        if self.lora is not None:
            for layer in self.lora.layer_names:
                for p, slot_lora in self.lora.for_layer(layer).items():
                    tensors[f"gfe.{layer}.{p}.down"] = slot_lora.down
                    tensors[f"gfe.{layer}.{p}.up"] = slot_lora.up
        if self.projections is not None:
            for layer in self.projections.layer_names:
                k, v = self.projections.pair(layer)
                tensors[f"da.{layer}.to_k"] = k.weight
                tensors[f"da.{layer}.to_v"] = v.weight
        return {k: t.detach().contiguous().cpu() for k, t in tensors.items()}


def save_checkpoint(model: AnyDressingModel, path: str | Path) -> None:
    save_file(model.state_dict_for_file(), str(path), metadata=model.info.to_metadata())


def read_info(path: str | Path) -> ModelInfo:
    """A checkpoint's metadata alone (its header): cheap enough for a dropdown's change event."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"'{path.name}' is not a readable safetensors file: {e}") from e
    return ModelInfo.from_metadata(meta, f"'{path.name}'")


def load_checkpoint(path: str | Path) -> AnyDressingModel:
    """Read and validate a checkpoint; every problem becomes a CheckpointError naming the file."""
    path = Path(path)
    where = f"'{path.name}'"
    if not path.is_file():
        raise CheckpointError(f"{where} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{where} is not a readable safetensors file (truncated or another format): {e}") from e
    info = ModelInfo.from_metadata(meta, where)
    try:
        return _assemble(info, tensors)
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"{where} has inconsistent tensors: {e}") from e


def _assemble(info: ModelInfo, tensors: dict[str, Tensor]) -> AnyDressingModel:
    groups: dict[str, dict[str, Tensor]] = {"garments_net": {}, "gfe": {}, "da": {}, "resampler": {}}
    for key, t in tensors.items():
        group, _, rest = key.partition(".")
        if group not in groups:
            raise ValueError(f"unknown tensor '{key}'")
        groups[group][rest] = t
    model = AnyDressingModel(
        info, garments_net_weights=groups["garments_net"] or None, resampler_weights=groups["resampler"] or None
    )
    if groups["da"]:
        layers = sorted({k.rsplit(".", 1)[0] for k in groups["da"]}, key=_layer_order)
        dims = {n: (groups["da"][f"{n}.to_k"].shape[1], groups["da"][f"{n}.to_k"].shape[0]) for n in layers}
        dtype = groups["da"][f"{layers[0]}.to_k"].dtype
        model.projections = DressingProjections(dims).to(dtype).requires_grad_(False)
        for n in layers:
            k, v = model.projections.pair(n)
            _copy(k.weight, groups["da"][f"{n}.to_k"], f"da.{n}.to_k")
            _copy(v.weight, groups["da"][f"{n}.to_v"], f"da.{n}.to_v")
    if groups["gfe"]:
        layers = sorted({k.rsplit(".", 2)[0] for k in groups["gfe"]}, key=_layer_order)
        first = groups["gfe"][f"{layers[0]}.q.down"]
        n_slots, rank = first.shape[0], first.shape[1]
        if info.lora_rank and rank != info.lora_rank:
            raise ValueError(f"LoRA rank {rank} but metadata says {info.lora_rank}")
        dims = {n: (groups["gfe"][f"{n}.q.down"].shape[2], groups["gfe"][f"{n}.q.up"].shape[1]) for n in layers}
        model.lora = (
            GarmentLoRA(dims, n_slots, rank, info.lora_alpha or float(rank)).to(first.dtype).requires_grad_(False)
        )
        for n in layers:
            for p in PROJECTIONS:
                slot_lora = model.lora.for_layer(n)[p]
                _copy(slot_lora.down, groups["gfe"][f"{n}.{p}.down"], f"gfe.{n}.{p}.down")
                _copy(slot_lora.up, groups["gfe"][f"{n}.{p}.up"], f"gfe.{n}.{p}.up")
    return model


def _copy(dst: Tensor, src: Tensor, key: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"'{key}' has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    with torch.no_grad():
        dst.copy_(src)


def _layer_order(name: str) -> tuple[int, int]:
    group, _, rest = name.partition(".")
    index = int(rest.split(".", 1)[0]) if group != "middle_block" else 0
    return ({"input_blocks": 0, "middle_block": 1, "output_blocks": 2}.get(group, 3), index)
