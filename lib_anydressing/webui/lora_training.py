"""The WebUI's loaded checkpoint lent to the garment LoRA trainer, then given back exactly.

The only place that touches `shared.sd_model` for training. While the loan lasts, A1111's queue lock
is held (generations and checkpoint switches wait instead of running on a model that is being
trained), and the model is first sent to the CPU the way A1111 unloads it (VRAM free for the trainer,
which moves what it needs). Afterwards every parameter and buffer gets back its original tensor,
device, dtype and requires_grad, and every module its attributes, submodules and hooks: success,
exception or interrupt alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..sd.checkpoint import StableDiffusion

DICTS = ("_parameters", "_buffers", "_modules", "_forward_pre_hooks", "_forward_hooks")


class WebUIModelError(RuntimeError):
    """Why the loaded checkpoint cannot be trained on, for the user."""


@dataclass
class ModelSnapshot:
    """Everything a trainer may change on a model, recorded so `restore` puts it back as it was:
    each module's attributes (mode, checkpointing flags, instance methods), its submodule and hook
    tables, and each tensor's data, device and requires_grad."""

    tensors: list[tuple[nn.Module, str, str, torch.Tensor, torch.device, bool]] = field(default_factory=list)
    modules: list[tuple[nn.Module, dict[str, Any], dict[str, dict]]] = field(default_factory=list)

    @classmethod
    def take(cls, model: nn.Module, devices: dict[tuple[int, str, str], torch.device] | None = None) -> ModelSnapshot:
        """`devices`: where each tensor goes back to, when they were recorded before an unload."""
        snap = cls()
        for module in model.modules():
            for kind in ("_parameters", "_buffers"):
                for name, t in getattr(module, kind).items():
                    if t is not None:
                        device = (devices or {}).get((id(module), kind, name), t.device)
                        snap.tensors.append((module, kind, name, t.data, device, t.requires_grad))
            snap.modules.append((module, dict(module.__dict__), {d: dict(module.__dict__[d]) for d in DICTS}))
        return snap

    def restore(self) -> None:
        for module, attributes, tables in self.modules:
            module.__dict__.clear()
            module.__dict__.update(attributes)
            for name, content in tables.items():
                module.__dict__[name].clear()
                module.__dict__[name].update(content)
        for module, kind, name, data, device, requires_grad in self.tensors:
            if kind == "_parameters":
                module._parameters[name].data = data.to(device)
                module._parameters[name].requires_grad_(requires_grad)
            else:
                module._buffers[name] = data.to(device)


def hide_lowvram_hooks(sd_model: nn.Module) -> None:
    """A1111's --lowvram/--medvram move modules between devices from forward pre-hooks and wrapped
    VAE encode/decode; the trainer places modules itself, so they are off during the loan (the
    snapshot brings them back)."""
    for module in sd_model.modules():
        module._forward_pre_hooks.clear()
    for name in ("encode", "decode"):
        sd_model.first_stage_model.__dict__.pop(name, None)


def tensor_devices(model: nn.Module) -> dict[tuple[int, str, str], torch.device]:
    return {
        (id(module), kind, name): t.device
        for module in model.modules()
        for kind in ("_parameters", "_buffers")
        for name, t in getattr(module, kind).items()
        if t is not None
    }


def refusal(sd_model: Any, fp8: bool = False) -> str | None:
    if sd_model is None:
        return "no checkpoint is loaded in the WebUI"
    if fp8:
        return "the UNet is stored in FP8 (Settings > Optimizations > FP8 weight): turn it off to train"
    if hasattr(sd_model, "forge_objects"):
        return "Forge is not supported for training yet"
    if not (getattr(sd_model, "is_sd1", False) or getattr(sd_model, "is_sdxl", False)):
        return "the loaded checkpoint is neither SD1.x nor SDXL (SD2 and SD3 LoRA training is not supported)"
    if sd_model.model.diffusion_model.input_blocks[0][0].in_channels != 4:
        return "the loaded checkpoint is an inpainting (or other non-4-channel) model: load a plain SD1.x or SDXL one"
    if any(getattr(m, "network_current_names", ()) for m in sd_model.modules()):
        return (
            "the WebUI still has a LoRA merged into the model from the last generation: generate once with no "
            "<lora:...> in the prompt (that takes it off), then train"
        )
    return None


@contextmanager
def loaned_model() -> Iterator[StableDiffusion]:
    """The loaded checkpoint as a StableDiffusion for the trainer; restored exactly on exit."""
    from modules import call_queue, devices, lowvram, sd_models, shared

    with call_queue.queue_lock:
        sd_model = shared.sd_model
        reason = refusal(sd_model, getattr(devices, "fp8", False))
        if reason is not None:
            raise WebUIModelError(reason)
        where = tensor_devices(sd_model)
        in_gpu = lowvram.module_in_gpu
        sd_models.unload_model_weights(sd_model)  # to the CPU (under --lowvram/--medvram: its module on the GPU)
        snapshot = ModelSnapshot.take(sd_model, where)
        try:
            hide_lowvram_hooks(sd_model)
            from modules.prompt_parser import SdConditioning

            lent = lent_model(sd_model, int(getattr(shared.opts, "CLIP_stop_at_last_layers", 1)), SdConditioning)
            yield lent.to(devices.device)  # only what training needs comes back to the GPU, in the model's dtype
        finally:
            snapshot.restore()
            lowvram.module_in_gpu = in_gpu
            devices.torch_gc()


def lent_model(sd_model: Any, clip_skip: int, conditioning_batch: Callable[..., list[str]]) -> StableDiffusion:
    """A1111's loaded model as the trainer's StableDiffusion: SD1.x with its CLIP text encoder; SDXL (sgm's
    DiffusionEngine) with its conditioner, through the WebUI's own get_learned_conditioning (both text
    encoders, the size inputs; frozen). `conditioning_batch`: A1111's prompt_parser.SdConditioning, a list
    of prompts that carries the image's width and height."""
    alphas = getattr(sd_model, "alphas_cumprod_original", None)
    common = {
        "unet": sd_model.model.diffusion_model,
        "vae": sd_model.first_stage_model,
        "prediction": "v" if getattr(sd_model, "parameterization", "eps") == "v" else "eps",
        "latent_scale": float(sd_model.scale_factor),
        "alphas_cumprod": (sd_model.alphas_cumprod if alphas is None else alphas).detach().float().cpu(),
    }
    if getattr(sd_model, "is_sdxl", False):

        def condition(prompts: list[str], size_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
            batch = conditioning_batch(prompts, width=size_hw[1], height=size_hw[0])
            cond = sd_model.get_learned_conditioning(batch)
            return {"context": cond["crossattn"], "y": cond["vector"]}

        return StableDiffusion(**common, text_encoder=sd_model.conditioner, tokenizer=None, conditioner=condition)
    embedder = sd_model.cond_stage_model.wrapped
    return StableDiffusion(
        **common, text_encoder=embedder.transformer, tokenizer=embedder.tokenizer, clip_skip=clip_skip
    )


def lora_dir() -> Path:
    """Where the WebUI's Lora extension looks (its --lora-dir, models/Lora by default)."""
    from modules import paths, shared

    return Path(getattr(shared.cmd_opts, "lora_dir", None) or Path(paths.models_path) / "Lora")


class WebUIHost:
    """The tab's TrainingHost in the WebUI: the loaded checkpoint, LoRAs saved where the WebUI finds them."""

    uses_loaded_model = True

    def lora_dir(self) -> Path:
        return lora_dir()

    def model(self, checkpoint: str = "", tokenizer: str = "") -> AbstractContextManager[StableDiffusion]:
        return loaned_model()

    def base_name(self, checkpoint: str = "") -> str:
        from modules import shared

        info = getattr(shared.sd_model, "sd_checkpoint_info", None)
        return getattr(info, "name_for_extra", "") or ""
