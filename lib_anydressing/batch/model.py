"""What a batch worker holds: the Stable Diffusion checkpoint, the AnyDressing model, and their names for the
infotext; described by a small picklable `ModelSpec` so a Ray actor on another machine loads the same."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..engine import AnyDressingModel, load_checkpoint
from ..generation.model_files import TRAINING_FREE, model_dirs, resolve_model, short_hash
from ..sd.architectures import SD15_UNET, TINY_TEXT, TINY_VAE
from ..sd.checkpoint import StableDiffusion, load_sd_checkpoint
from .control import load_controlnet

DEMO = "demo"  # the built-in checkpoint: SD1.5's UNet topology, narrow, seeded random weights, no download
DEMO_NAME = "anydressing-demo"


@dataclass(frozen=True)
class ModelSpec:
    checkpoint: str = DEMO  # a single-file SD1.x checkpoint, or "demo"
    model: str = TRAINING_FREE  # the AnyDressing model: training-free, a .safetensors path, or a models/ name
    device: str = ""  # "" = cuda when available, else cpu
    half: bool | None = None  # fp16 weights; None = on CUDA only
    tokenizer: str = ""  # a CLIP tokenizer folder; "" = what the environment has (see sd/tokenizer.py)
    controlnet: str = ""  # a ControlNet model file for jobs with a pose image

    def load(self) -> BatchModel:
        device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        half = device.type == "cuda" if self.half is None else self.half
        dtype = torch.float16 if half else torch.float32
        if self.checkpoint == DEMO:
            sd, name, sha = demo_model(), DEMO_NAME, None
        else:
            path = Path(self.checkpoint)
            sd = load_sd_checkpoint(path, tokenizer=self.tokenizer or None)
            name, sha = path.stem, file_sha256(path)[:10]
        sd.to(device, dtype)
        path = resolve_model(self.model, model_dirs())
        if path is None:
            dressing, label = AnyDressingModel.training_free(), TRAINING_FREE
        else:
            dressing, label = load_checkpoint(path), f"{path.stem} [{short_hash(path)}]"
        control, control_label = None, ""
        if self.controlnet:
            control_path = Path(self.controlnet)
            control = load_controlnet(control_path, dtype).to(device)
            control_label = f"{control_path.stem} [{short_hash(control_path)}]"
        return BatchModel(sd, dressing, name, sha, label, f"{label}:{sha or name}", device, dtype, control,
                          control_label)  # fmt: skip


@dataclass
class BatchModel:
    sd: StableDiffusion
    dressing: AnyDressingModel
    checkpoint_name: str  # A1111's "Model": the file name without extension
    checkpoint_hash: str | None  # A1111's "Model hash": the first 10 hex digits of the file's sha256
    dressing_label: str  # the AnyDressing model with its short hash, as the WebUI writes it
    cache_key: str  # what the garment features depend on besides the garments
    device: torch.device
    dtype: torch.dtype
    controlnet: nn.Module | None = None  # diffusers' ControlNetModel
    controlnet_label: str = ""  # name [short hash], as the WebUI's ControlNet writes it


def demo_model(seed: int = 0) -> StableDiffusion:
    """The demo command's kind of model: SD1.5's UNet topology at width 64, a tiny VAE and text encoder."""
    from ..sd.random_models import random_stable_diffusion

    unet = {**SD15_UNET, "model_channels": 64, "context_dim": TINY_TEXT["hidden_size"]}
    return random_stable_diffusion(unet=unet, vae=TINY_VAE, text=TINY_TEXT, seed=seed)


def file_sha256(path: Path) -> str:
    """The whole file's sha256, as A1111 hashes checkpoints (its "Model hash" is the first 10 digits)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
