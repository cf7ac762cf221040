"""What the peer converters share: processor-indexed projections, diffusers UNets, a report."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import Tensor

from ..engine import AnyDressingModel, DressingProjections
from ..sd.unet_keys import convert_unet, self_attention_processor_order
from .safe_load import ConversionError


@dataclass
class Conversion:
    """A converted model, and what happened to every source key."""

    model: AnyDressingModel
    used: list[str] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)  # key -> why it is not needed

    def summary(self) -> str:
        reasons: dict[str, int] = {}
        for why in self.ignored.values():
            reasons[why] = reasons.get(why, 0) + 1
        lines = [f"{len(self.used)} tensors converted"]
        lines += [f"{n} tensors not needed: {why}" for why, n in reasons.items()]
        return "\n".join(lines)


def projections_from_processors(
    weights: dict[str, Tensor], k_name: str, v_name: str, source: str
) -> tuple[DressingProjections, list[str]]:
    """`{i}.{k_name}.weight` / `{i}.{v_name}.weight` for even i (attn1 in diffusers processor order)."""
    order = self_attention_processor_order()
    pattern = re.compile(rf"^(\d+)\.({re.escape(k_name)}|{re.escape(v_name)})\.weight$")
    found: dict[tuple[int, str], Tensor] = {}
    for key, t in weights.items():
        m = pattern.match(key)
        if m is None:
            raise ConversionError(f"{source}: unexpected tensor '{key}'")
        index = int(m.group(1))
        if index % 2 or index // 2 >= len(order):
            raise ConversionError(f"{source}: '{key}' is not a self-attention processor of SD1.5 (even 0..30)")
        found[(index, m.group(2))] = t
    dims = {}
    for j, layer in enumerate(order):
        for name in (k_name, v_name):
            if (2 * j, name) not in found:
                raise ConversionError(f"{source}: '{2 * j}.{name}.weight' is missing")
        k = found[(2 * j, k_name)]
        if k.ndim != 2 or found[(2 * j, v_name)].shape != k.shape:
            raise ConversionError(
                f"{source}: processor {2 * j} has shapes {tuple(k.shape)} and " f"{tuple(found[(2 * j, v_name)].shape)}"
            )
        dims[layer] = (k.shape[1], k.shape[0])
    projections = DressingProjections(dims).to(next(iter(found.values())).dtype).requires_grad_(False)
    for j, layer in enumerate(order):
        to_k, to_v = projections.pair(layer)
        to_k.weight.copy_(found[(2 * j, k_name)])
        to_v.weight.copy_(found[(2 * j, v_name)])
    return projections, list(weights)


def garments_net_from_diffusers(weights: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """A diffusers UNet state dict in ldm names; a key outside the UNet is an error naming it."""
    try:
        return convert_unet(weights)
    except KeyError as e:
        raise ConversionError(f"{source}: {e.args[0]}") from e


def check_widths(garments_net: dict[str, Tensor], projections: DressingProjections, source: str) -> None:
    """The projections must fit the reference UNet they come with (catches files from different models)."""
    for layer in projections.layer_names:
        q = garments_net.get(f"{layer}.attn1.to_q.weight")
        k, _ = projections.pair(layer)
        if q is not None and q.shape[0] != k.in_features:
            raise ConversionError(
                f"{source}: layer {layer} is {q.shape[0]} wide in the reference UNet "
                f"but {k.in_features} in the projections"
            )
