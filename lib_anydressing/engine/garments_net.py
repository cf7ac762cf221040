"""GarmentsNet: runs all garments through a UNet once, at timestep 0, and keeps per-layer features.

The UNet is either the running model itself (training-free: shared, nothing copied) or a separate
network loaded from a checkpoint. Extraction patches the network only for the duration of one
forward and restores it in `finally`, so a shared UNet is left exactly as it was.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..sd.forward_patch import ForwardPatch
from .gfe_lora import PROJECTIONS, GarmentLoRA
from .unet_layers import input_channels, self_attention_layers

TapPoint = Literal["attn_output", "attn_input"]
CrossAttentionMode = Literal["skip", "empty_prompt"]
TAP_POINTS = ("attn_output", "attn_input")
CROSS_ATTENTION_MODES = ("skip", "empty_prompt")


@dataclass
class GarmentFeatures:
    """Per-layer garment tokens, (N, T_layer, C), in the target UNet's dtype and device.

    `latent_hw` is the garment latents' size, from which each layer's token grid follows (needed to
    pool tokens; None where the features did not come from latents).
    """

    per_layer: dict[str, Tensor]
    n_garments: int
    latent_hw: tuple[int, int] | None = None

    @property
    def nbytes(self) -> int:
        """Memory the features take (SDXL, 2 garments on 1024x1024 canvases, fp16: 400 MiB; README)."""
        return sum(f.nbytes for f in self.per_layer.values())

    def to(self, device: torch.device | str) -> GarmentFeatures:
        """The same features on `device` (no copy where they already are)."""
        per_layer = {name: f.to(device) for name, f in self.per_layer.items()}
        return GarmentFeatures(per_layer, self.n_garments, self.latent_hw)


class _StopExtraction(Exception):
    """Raised after the last tapped layer: the rest of the UNet is not needed."""


def skip_cross_attention(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """Stands in for attn2 when GarmentsNet has no cross-attention: `x + attn2(...)` becomes `x`."""
    return torch.zeros_like(x)


class _NoCrossAttention(nn.Module):
    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return skip_cross_attention(x)


class GarmentsNet(nn.Module):
    """A UNet (own or shared) plus optional per-slot LoRAs, tapped at every self-attention layer."""

    def __init__(
        self,
        unet: nn.Module,
        *,
        lora: GarmentLoRA | None = None,
        tap: TapPoint = "attn_output",
        cross_attention: CrossAttentionMode = "skip",
        shared: bool = False,
    ) -> None:
        super().__init__()
        if shared:
            self.__dict__["unet"] = unet  # not a submodule: the user's model must not be moved/saved with us
        else:
            self.unet = unet
        self.lora = lora
        self.tap = tap
        self.cross_attention = cross_attention
        self.shared = shared
        self.layers = self_attention_layers(unet)
        if not self.layers:
            raise ValueError("this UNet has no self-attention transformer blocks (input/middle/output_blocks)")
        if lora is not None:
            missing = [layer.name for layer in self.layers if layer.name not in lora.layer_names]
            if missing:
                raise ValueError(f"GFE LoRA has no weights for layers {missing[:3]}...")

    @classmethod
    def from_state_dict(
        cls, template: nn.Module, state_dict: dict[str, Tensor], *, partial: bool = False, **kwargs: Any
    ) -> GarmentsNet:
        """A separate GarmentsNet with `template`'s structure and `state_dict`'s weights.

        The structure is copied onto the meta device first, so building it never holds a second full
        set of weights; instance-level forward overrides (other extensions' hooks) are not copied.
        `partial`: keys the weights lack are the template's own tensors, shared, not copied
        (MagicClothing's extractor is loaded that way over the base UNet).
        """
        unet = _structure_copy(template)
        _fit_input_conv(unet, state_dict)
        if kwargs.get("cross_attention", "skip") == "skip":
            for layer in self_attention_layers(unet):
                layer.block.attn2 = _NoCrossAttention()
        expected = set(unet.state_dict())
        if partial:
            base = template.state_dict()
            state_dict = {**{k: base[k] for k in expected - set(state_dict)}, **state_dict}
        missing = sorted(expected - set(state_dict))
        unexpected = sorted(set(state_dict) - expected)
        if missing or unexpected:
            raise ValueError(
                f"GarmentsNet weights do not fit this UNet: {len(missing)} missing (e.g. {missing[:2]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
            )
        unet.load_state_dict(state_dict, strict=True, assign=True)
        return cls(unet, **kwargs)

    def extract(
        self,
        latents: Tensor,
        *,
        slots: Sequence[int] | None = None,
        context: Tensor | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> GarmentFeatures:
        """One batched forward of all N garment latents (N, 4, h, w) at timestep 0.

        slots[i] picks the LoRA of garment i (default: garment i uses slot i). `context` is the
        empty-prompt embedding (1 or N rows) for checkpoints that keep cross-attention. `device` and
        `dtype` are where the inputs go and the features stay, default the UNet's first weight's
        (which the WebUI's low-VRAM modes may keep on the CPU: pass the sampling device there).
        Runs under the caller's grad mode, so training can backpropagate through it.
        """
        n = latents.shape[0]
        if n == 0:
            raise ValueError("no garments to extract")
        slot_ids = list(range(n)) if slots is None else list(slots)
        if len(slot_ids) != n:
            raise ValueError(f"{n} garments but {len(slot_ids)} slot indices")
        if self.lora is not None and not all(0 <= s < self.lora.n_slots for s in slot_ids):
            raise ValueError(f"slot indices {slot_ids} out of range for {self.lora.n_slots} GFE slots")
        if self.cross_attention == "empty_prompt" and context is None:
            raise ValueError("this GarmentsNet needs the empty-prompt embedding as context")
        param = next(self.unet.parameters())
        device = torch.device(device) if device is not None else param.device
        dtype = dtype or param.dtype
        context = context.to(device, dtype).expand(n, -1, -1) if self.cross_attention == "empty_prompt" else None
        x = inpainting_input(latents.to(device, dtype), input_channels(self.unet))
        timesteps = torch.zeros(n, device=device, dtype=dtype)
        slot_t = torch.tensor(slot_ids, device=device)

        captured: dict[str, Tensor] = {}
        patches = self._patches(captured, slot_t)
        try:
            type(self.unet).forward(self.unet, x, timesteps=timesteps, context=context, **_class_input(self.unet, x))
        except _StopExtraction:
            pass
        finally:
            for patch in reversed(patches):
                patch.restore()
        per_layer = {name: f.to(device=device, dtype=dtype) for name, f in captured.items()}
        return GarmentFeatures(per_layer, n, (latents.shape[-2], latents.shape[-1]))

    def _patches(self, captured: dict[str, Tensor], slots: Tensor) -> list[ForwardPatch]:
        patches: list[ForwardPatch] = []
        last = self.layers[-1].name
        for layer in self.layers:
            if self.lora is not None:
                loras = self.lora.for_layer(layer.name)
                for p in PROJECTIONS:
                    linear = getattr(layer.attn, f"to_{p}")
                    patches.append(ForwardPatch(linear, _with_lora(loras[p], slots)))
            if self.cross_attention == "skip" and not isinstance(layer.block.attn2, _NoCrossAttention):
                patches.append(ForwardPatch(layer.block.attn2, lambda inner: skip_cross_attention))
            patches.append(ForwardPatch(layer.attn, _tap(layer.name, self.tap, captured, stop=layer.name == last)))
        return patches


def inpainting_input(latents: Tensor, channels: int) -> Tensor:
    """What an inpainting UNet (9 input channels: latent, mask, masked-image latent) is given for a garment.

    Decided once: mask 0 ("nothing to fill in") and the garment itself as the masked image. The inpainting
    UNet then sees a whole, known image, the state in which a 4-channel UNet sees a clean garment latent
    at timestep 0; a full mask over a blank image would instead ask it to invent the garment. Other
    channel counts (4) pass through.
    """
    if channels != 9:
        return latents
    mask = latents.new_zeros(latents.shape[0], 1, *latents.shape[2:])
    return torch.cat([latents, mask, latents], dim=1)


def _fit_input_conv(unet: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """A separate GarmentsNet keeps its own input conv: a 4-channel extractor (AnyDressing's, a peer's)
    copied from a 9-channel inpainting UNet gets a 4-channel conv, so its weights fit and it reads garments
    as it was trained to."""
    key = "input_blocks.0.0.weight"
    conv = unet.input_blocks[0][0] if hasattr(unet, "input_blocks") else None
    weight = state_dict.get(key)
    if conv is None or weight is None or weight.shape[1] == conv.in_channels:
        return
    fitted = copy.deepcopy(conv)  # the same class (Forge's own Conv2d too), on the meta device
    fitted.in_channels = weight.shape[1]
    fitted.weight = nn.Parameter(torch.empty(weight.shape, device="meta"), requires_grad=False)
    unet.input_blocks[0][0] = fitted


def _with_lora(lora: nn.Module, slots: Tensor):
    def make(inner):
        def forward(x: Tensor) -> Tensor:
            return inner(x) + lora.delta(x, slots)

        return forward

    return make


def _tap(name: str, tap: TapPoint, captured: dict[str, Tensor], *, stop: bool):
    def make(inner):
        def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            if tap == "attn_input":
                captured[name] = x
                if stop:
                    raise _StopExtraction
                return inner(x, *args, **kwargs)
            out = inner(x, *args, **kwargs)
            captured[name] = out
            if stop:
                raise _StopExtraction
            return out

        return forward

    return make


def _structure_copy(template: nn.Module) -> nn.Module:
    """`template`'s module tree with meta tensors, and none of what the WebUI attached to it.

    Left behind: instance forward overrides (other extensions' hooks), torch hooks (lowvram's
    device moves), stray tensors and A1111 Lora's `network_*` bookkeeping. That bookkeeping would
    make A1111 apply the user's LoRA to GarmentsNet, and, where GarmentsNet shares the base UNet's
    tensors, write it into the user's weights.
    """
    memo: dict[int, Any] = {}
    for t in itertools.chain(template.parameters(), template.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=False) if isinstance(t, nn.Parameter) else meta
    for module in template.modules():
        for value in module.__dict__.values():
            for t in value if isinstance(value, tuple | list) else (value,):
                if isinstance(t, Tensor) and id(t) not in memo:
                    memo[id(t)] = None  # e.g. a LoRA weight backup: never copied
    clone = copy.deepcopy(template, memo)
    for module in clone.modules():
        for attr in [a for a in module.__dict__ if a in ("forward", "_forward") or a.startswith("network_")]:
            del module.__dict__[attr]
        for name, hooks in vars(module).items():
            if name.startswith(("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")):
                hooks.clear()
    return clone


def _class_input(unet: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """UNets with a class/pooled-text input (SDXL's `y`) get zeros: the garments carry no such condition."""
    if getattr(unet, "num_classes", None) is None:
        return {}
    # by `in_features`, not nn.Linear: Forge's Linear (backend.operations) is a plain nn.Module
    linear = next((m for m in unet.label_emb.modules() if hasattr(m, "in_features")), None)
    if linear is None:  # class labels (an nn.Embedding): class 0
        return {"y": torch.zeros(x.shape[0], dtype=torch.long, device=x.device)}
    return {"y": x.new_zeros(x.shape[0], linear.in_features)}
