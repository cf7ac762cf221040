"""The trainer's settings, read from a TOML file whose sections ([model], [data], [train], [loss]) only group keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..files.config import ConfigFileError, read_toml
from ..files.settings_model import Field, Settings, ValidationError, problems_of
from ..garments import CATEGORIES
from ..training.loop import PRECISIONS, RESUME_HELP
from .losses import LossSwitches

SECTIONS = ("model", "data", "train", "loss")
PATH_KEYS = ("sd_checkpoint", "tokenizer", "vgg16_weights", "dists_weights", "manifest", "output_dir", "resume")


class ConfigError(ValueError):
    """A training config that cannot be used, with a message meant for the user."""


class TrainConfig(Settings):
    # [model]
    sd_checkpoint: str = ""  # SD1.x single file (.safetensors/.ckpt), the WebUI's layout
    tokenizer: str = ""  # folder with vocab.json + merges.txt; empty: what the environment has
    slots: list[str] = Field(default_factory=lambda: list(CATEGORIES))  # GFE slot names = garment categories
    lora_rank: int = 16
    lora_alpha: float = 16.0
    da_strength: float = 1.0  # lambda of eq. 6 while training (the checkpoint's default for sampling is 0.7)
    vgg16_weights: str = ""  # torchvision VGG16 state dict for DISTS; empty: no L_perc
    dists_weights: str = ""  # DISTS alpha/beta; empty: torchmetrics' or DISTS_pytorch's packaged file, else uniform
    # [data]
    manifest: str = ""
    size: list[int] = Field(default_factory=lambda: [768, 576])  # person image (height, width)
    garment_size: list[int] = Field(default_factory=lambda: [768, 576])
    max_garments: int = 4
    cache_latents: bool = False  # VAE latents of each sample stored under output_dir/latent_cache
    num_workers: int = 2
    # [train]
    output_dir: str = "outputs/anydressing/train"
    steps: int = 100_000
    lr: float = 5e-5
    weight_decay: float = 0.01
    gradient_accumulation: int = 1  # samples per optimizer step (each sample is its own forward)
    mixed_precision: str = "auto"  # auto, fp32, fp16, bf16; auto: bf16 on CUDA when supported, else fp16; fp32 on CPU
    max_grad_norm: float = 0.0  # 0: no gradient clipping
    warmup_steps: int = 0  # linear learning-rate warm-up
    gradient_checkpointing: bool = False
    seed: int = 0
    uncond_dropout: float = 0.1  # neither text nor garments (the CFG branch of eq. 16)
    caption_dropout: float = 0.0  # text dropped, garments kept
    garment_dropout: float = 0.0  # garments dropped, text kept
    save_every: int = 1000
    keep_checkpoints: int = 0  # 0: keep all periodic model files
    log_every: int = 10
    tensorboard: bool = False  # also a TensorBoard event log under output_dir/tensorboard (needs the package)
    sample_every: int = 0  # 0: no sample grids
    sample_steps: int = 20
    resume: str = "latest"  # latest: output_dir/state when present; no: start afresh; or a state folder
    device: str = ""  # empty: cuda when available
    devices: int = 1  # processes (GPUs) on this machine, through Fabric's DDP; torchrun's setting wins
    # [loss]
    loss_ldm: bool = LossSwitches.ldm  # the paper's values live in LossSwitches, once
    loss_loc: bool = LossSwitches.loc
    loss_perc: bool = LossSwitches.perc
    loss_hf: bool = LossSwitches.hf
    lambda_loc: float = LossSwitches.lambda_loc
    lambda_texture: float = LossSwitches.lambda_texture
    eta: int = LossSwitches.eta

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise ConfigError(problems_of(e)) from e
        self.check()

    def check(self) -> None:
        """The rules between values (and ranges), checked again after a command line overrides some."""
        problems = []
        if self.mixed_precision not in PRECISIONS:
            problems.append(f"mixed_precision must be one of {', '.join(PRECISIONS)}")
        if not self.resume:
            problems.append(f"resume must be {RESUME_HELP}")
        for name in ("size", "garment_size"):
            hw = getattr(self, name)
            if len(hw) != 2 or any(int(v) <= 0 or int(v) % 64 for v in hw):
                problems.append(f"{name} must be [height, width], multiples of 64")
        for name in ("uncond_dropout", "caption_dropout", "garment_dropout"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name} must be in [0, 1]")
        if self.uncond_dropout + self.caption_dropout + self.garment_dropout > 1:
            problems.append("the three dropout probabilities add up to more than 1")
        for name in ("steps", "gradient_accumulation", "lora_rank", "max_garments", "save_every", "log_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if not self.slots or len(set(self.slots)) != len(self.slots):
            problems.append("slots must be distinct names")
        if problems:
            raise ConfigError("; ".join(problems))

    @classmethod
    def from_toml(cls, path: str | Path) -> TrainConfig:
        try:
            data = read_toml(path, path_keys=PATH_KEYS, words=("latest", "no"))
        except ConfigFileError as e:
            raise ConfigError(str(e)) from e
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Flatten the sections (they only group keys)."""
        flat: dict[str, Any] = {}
        for key, value in data.items():
            if key in SECTIONS and isinstance(value, dict):
                flat.update(value)
            else:
                flat[key] = value
        return cls(**flat)
