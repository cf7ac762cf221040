"""The WebUI's answers to what the controller asks, from `modules.*` (A1111) and `backend.*` (Forge).

Only lib_anydressing/webui/ imports them (env.py, forge.py, lora_training.py, accordion.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..generation.model_files import model_dirs
from ..sd.vae import posterior_mean
from ..segment.parser import EXTENSION_PARSER_DIR
from .forge import is_forge

SECTION = ("anydressing", "AnyDressing")


class A1111Env:
    def model_dirs(self) -> list[Path]:
        from modules import paths, shared

        extra = [
            Path(paths.models_path) / "AnyDressing",
            getattr(shared.cmd_opts, "anydressing_models_dir", None),
            getattr(shared.opts, "anydressing_models_dir", "") or None,
        ]
        return model_dirs(extra)

    def parser_dirs(self) -> list[Path]:
        """Where clothes parsers are looked for (and then the HF cache): models/parser of the extension, of
        the WebUI."""
        from modules import paths

        return [EXTENSION_PARSER_DIR, Path(paths.models_path) / "parser"]

    def parser_name(self) -> str:
        from modules import shared

        return str(getattr(shared.opts, "anydressing_parser", "") or "")

    def offload_garments_net(self) -> bool:
        from modules import shared

        return bool(getattr(shared.opts, "anydressing_lowvram", default_lowvram()))

    def cache_size(self) -> int:
        from modules import shared

        return int(getattr(shared.opts, "anydressing_cache_size", 2))

    def image_encoder_dir(self) -> str | None:
        from modules import shared

        return getattr(shared.opts, "anydressing_image_encoder", "") or None

    def refusal(self, p: Any) -> str | None:
        """Why this generation cannot be dressed, or None."""
        from modules import sd_unet, shared

        if is_forge(p) and not any(getattr(p.sd_model, f"is_{kind}", False) for kind in ("sd1", "sd2", "sdxl")):
            name = type(p.sd_model).__name__
            return f"this model ({name}) is not a UNet: Flux, SD3 and Chroma have no UNet self-attention to dress"
        storage = getattr(p.sd_model.forge_objects.unet.model, "storage_dtype", None) if is_forge(p) else None
        if isinstance(storage, str):  # Forge names its quantised formats: 'nf4', 'fp4', 'gguf'
            return (
                f"this UNet is stored as {storage}, which AnyDressing has not been verified with; set "
                "'Diffusion in Low Bits' to Automatic or float8-e4m3fn, with a checkpoint that is not GGUF"
            )
        if getattr(p.sd_model, "is_sd3", False):
            return "SD3 has no UNet self-attention layers to dress"
        if sd_unet.current_unet is not None:
            return (
                f"the UNet is replaced by {type(sd_unet.current_unet).__name__} (TensorRT or another custom UNet), "
                "which bypasses the attention layers AnyDressing patches; set 'SD Unet' to None"
            )
        hires = getattr(p, "enable_hr", False) and getattr(shared.opts, "hypertile_enable_unet_secondpass", False)
        if getattr(shared.opts, "hypertile_enable_unet", False) or hires:
            return "Hypertile tiles the self-attention that AnyDressing needs whole; turn off Hypertile U-Net"
        return None

    def device(self) -> torch.device:
        from modules import devices

        return devices.device

    def dtype(self, p: Any) -> torch.dtype:
        """The UNet's compute dtype (Forge may store its weights in fp8 or 4 bits)."""
        if is_forge(p):
            return p.sd_model.forge_objects.unet.model.computation_dtype
        from modules import devices

        return devices.dtype_unet

    def load_unet(self, p: Any) -> None:
        """Bring the UNet to the GPU the WebUI's own way, before garment features are extracted.

        Forge: its memory manager loads the UnetPatcher that will sample, which also merges that
        patcher's LoRAs into the weights. A1111 under --medvram/--lowvram: its offloading hooks.
        """
        if is_forge(p):
            from backend import memory_management

            memory_management.load_model_gpu(p.sd_model.forge_objects.unet)
            return
        from modules import lowvram

        if lowvram.is_enabled(p.sd_model):  # --medvram hooks the whole model; --lowvram each block (runs by itself)
            for hook in list(p.sd_model.model._forward_pre_hooks.values()):
                if getattr(hook, "__name__", "") == "send_me_to_gpu":
                    hook(p.sd_model.model, ())

    def autocast(self) -> AbstractContextManager:
        from modules import devices

        return devices.autocast()

    def encode(self, p: Any, images: Tensor) -> Tensor:
        """Scaled latents of garment images in [-1, 1]: the VAE posterior's mean, on either WebUI.

        Not through the host's encode_first_stage: sgm (A1111's SDXL) and Forge sample the posterior
        there with the global RNG, so features cached from one request would depend on what ran first.
        """
        if is_forge(p):
            from backend import memory_management

            vae = p.sd_model.forge_objects.vae
            memory_management.load_model_gpu(vae.patcher)  # Forge's VAE may wait on the offload device
            mean = posterior_mean(vae.first_stage_model, images.to(vae.device, vae.vae_dtype))
            return vae.first_stage_model.process_in(mean)
        from modules import devices, lowvram

        vae = p.sd_model.first_stage_model
        with _a1111_on_device(vae, devices.device, lowvram.is_enabled(p.sd_model)):
            mean = posterior_mean(vae, images.to(devices.device, devices.dtype_vae))
        return mean * p.sd_model.scale_factor

    def empty_prompt(self, p: Any) -> Tensor | None:
        cond = p.sd_model.get_learned_conditioning([""])
        return cond["crossattn"] if isinstance(cond, dict) else cond


@contextmanager
def _a1111_on_device(vae: nn.Module, device: torch.device, lowvram: bool) -> Iterator[None]:
    """The VAE on the sampling device for the garments' encoding. Under --medvram/--lowvram A1111 moves
    it there only inside its wrapped encode(), which we do not call: take the GPU the same way (everything
    else off it) and give it back afterwards."""
    if not lowvram:
        yield
        return
    from modules import lowvram as a1111_lowvram

    a1111_lowvram.send_everything_to_cpu()
    vae.to(device)
    try:
        yield
    finally:
        vae.to("cpu")


def default_lowvram() -> bool:
    """Offload GarmentsNet by default when the WebUI itself saves VRAM."""
    from modules import shared

    flags = shared.cmd_opts
    return bool(flags.medvram or flags.lowvram or getattr(flags, "anydressing_lowvram", False))


def register_settings() -> None:
    import gradio as gr
    from modules import shared

    options = {
        "anydressing_models_dir": shared.OptionInfo("", "Extra folder for AnyDressing models"),
        "anydressing_lowvram": shared.OptionInfo(
            default_lowvram(), "Low VRAM: move a separate GarmentsNet off the GPU once garment features are extracted"
        ),
        "anydressing_max_slots": shared.OptionInfo(
            4, "Garment slots", gr.Slider, {"minimum": 1, "maximum": 8, "step": 1}
        ).needs_reload_ui(),
        "anydressing_cache_size": shared.OptionInfo(
            2, "Garment feature sets kept for re-generation", gr.Slider, {"minimum": 0, "maximum": 8, "step": 1}
        ),
        "anydressing_image_encoder": shared.OptionInfo(
            "", "CLIP-H image encoder folder (transformers format) for IMAGDressing models"
        ),
        "anydressing_parser": shared.OptionInfo(
            "",
            "Clothes parser for 'Mask from garments' and 'Split outfit' (a folder name in models/parser or an "
            "HF cache repo; empty: the first found)",
        ),
    }
    for key, info in options.items():
        info.section = SECTION
        shared.opts.add_option(key, info)


def max_slots() -> int:
    from modules import shared

    return int(getattr(shared.opts, "anydressing_max_slots", 4))
