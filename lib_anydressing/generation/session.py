"""One dressed generation: garment features (cached), Dressing-Attention on the UNet, step range, removal.

The WebUI adapters hand in what only they have (the UNet, a VAE encoder, the empty-prompt
embedding); everything else happens here, so it is tested without a WebUI.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..engine import AnyDressingModel, Dresser, GarmentFeatures, GarmentsNet, remove_dressing
from ..engine.image_prompt import garment_context
from .options import DressingOptions
from .prepare import (
    FeatureCache,
    content_key,
    garment_batch,
    garment_canvas,
    lora_slots,
    region_masks,
    region_notes,
)
from .rows import RowTracker

Encode = Callable[[Tensor], Tensor]  # (N, 3, H, W) in [-1, 1] -> scaled latents (N, 4, H/8, W/8)


@dataclass
class HostContext:
    """What only the WebUI (or a bench) has, for the GarmentsNet pass: where and in what dtype the UNet
    samples, its VAE encoder, the empty-prompt embedding, the CLIP image encoder folder, and whether a
    separate GarmentsNet goes back to the CPU after its pass (low VRAM)."""

    device: torch.device
    dtype: torch.dtype
    encode: Encode
    empty_prompt: Tensor | None
    image_encoder_dir: str | Path | None = None
    offload_garments_net: bool = False


@dataclass
class PreparedGarments:
    features: GarmentFeatures
    regions: list[Tensor | None]
    weights: list[float]
    from_cache: bool
    notes: list[str] = field(default_factory=list)


class DressingSession:
    """Lives for one generation (both passes of hires fix); `close()` leaves the UNet as it was."""

    def __init__(self, model: AnyDressingModel, opts: DressingOptions) -> None:
        self.model = model
        self.opts = opts
        self.strength = model.info.default_strength if opts.strength is None else opts.strength
        self.rows = RowTracker()
        self.dresser: Dresser | None = None
        self._hook = None
        self.prepared: PreparedGarments | None = None

    def prepare(
        self, garments_net: GarmentsNet, host: HostContext, *, target_wh: tuple[int, int], cache: FeatureCache,
        model_key: str,
    ) -> PreparedGarments:  # fmt: skip
        """Garment features for this generation: from the cache, or one GarmentsNet pass.

        A separate GarmentsNet (and any GFE LoRA) is brought to the host's device and dtype for the pass;
        a separate one goes back to the CPU after it when `host.offload_garments_net`, whatever happened.
        """
        slots = self.opts.slots
        device, dtype, image_encoder_dir = host.device, host.dtype, host.image_encoder_dir
        self.device, self.dtype = device, dtype
        canvas = garment_canvas(target_wh, slots, self.opts.resolution, self.opts.detail)
        slot_ids = lora_slots(self.model, slots)
        key = content_key(slots, model_key, canvas, slot_ids, dtype, str(device), str(image_encoder_dir))
        latent_hw = (target_wh[1] // 8, target_wh[0] // 8)
        regions = region_masks(slots, latent_hw)
        notes = region_notes(slots, regions, latent_hw)  # before extraction: it may refuse a region
        cached = cache.get(key)
        from_cache = cached is not None
        features = cached.to(device) if cached is not None else None
        if features is None:
            images = [s.masked_image() for s in slots]
            context, note = garment_context(self.model, images, host.empty_prompt, image_encoder_dir)
            notes += [note] if note else []
            if garments_net.lora is not None:
                garments_net.lora.to(device, dtype)
            try:
                if not garments_net.shared:
                    garments_net.to(device, dtype)
                with torch.no_grad():
                    latents = host.encode(garment_batch(slots, canvas).to(device))
                    features = garments_net.extract(
                        latents, slots=slot_ids, context=context, dtype=dtype, device=device
                    )
            finally:
                if host.offload_garments_net and not garments_net.shared:
                    garments_net.to("cpu")
            cache.put(key, features.to("cpu"))  # kept in RAM: no VRAM held between generations
        self.prepared = PreparedGarments(features, regions, [s.weight for s in slots], from_cache, notes)
        return self.prepared

    def make_dresser(self, unet: nn.Module) -> Dresser:
        """This session's Dresser for `unet`, not installed: A1111 installs it on the modules, Forge
        calls it from attn1 replace patches."""
        assert self.prepared is not None, "prepare() first"
        if self.model.projections is not None:
            self.model.projections.to(self.device, self.dtype)
        self.dresser = Dresser(
            unet,
            self.prepared.features,
            self.model.projections,
            strength=self.strength,
            weights=self.prepared.weights,
            regions=self.prepared.regions,
            fine_pool=self.opts.fine_pool,
        )
        return self.dresser

    def install(self, unet: nn.Module) -> None:
        """Dressing-Attention on `unet`, with a pre-hook that marks each call's conditional rows."""
        remove_dressing(unet)
        self.make_dresser(unet).install()
        self._hook = unet.register_forward_pre_hook(self._mark_rows, with_kwargs=True)

    def on_step(self, step: int, total: int, n_cond: int) -> None:
        """Called before each denoising step's UNet calls: rows restart, the range decides activity."""
        self.rows.new_step(n_cond)
        if self.dresser is not None:
            fraction = step / max(total, 1)
            self.dresser.active = self.opts.start <= fraction < self.opts.end

    def _mark_rows(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("x")
        if self.dresser is not None and isinstance(x, Tensor):
            self.dresser.cond_rows = self.rows.next_call(x.shape[0])
            self.dresser.cond_batch = x.shape[0]

    def close(self) -> None:
        """Remove everything this session put on the UNet; safe to call more than once."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.dresser is not None:
            self.dresser.remove()
            self.dresser = None
