"""Train a garment LoRA on a dataset folder: images (RGBA: alpha = loss mask) + same-name `.txt` captions.

The API the tab and the headless command call:

    model = load_sd_checkpoint(path)            # or a StableDiffusion over the WebUI's loaded modules
    config = TrainConfig(dataset_dir=..., output_dir=..., name="red_shirt", **PRESETS["12 GB"])
    result = train_lora(model, config, on_progress=callback, stop=threading.Event())

The LoRA is patched onto the user's modules and comes off on every path (done, interrupted, NaN,
exception); it is never merged, the base weights get no gradient and their requires_grad flags are
restored as found. The loop is the shared one of training/loop.py (precision, accumulation, several
processes); state is saved at each epoch end and on interrupt (`<name>-state/`, training/state.py's format),
and a later call with `resume="latest"` continues where it stopped (equal to an uninterrupted run up to
float rounding: README, What resume guarantees).
The stop flag is also read while the images and captions are encoded, before the first step.
A NaN/inf loss stops the run before the bad update, keeping the last good checkpoint.
"""

from __future__ import annotations

import itertools
import math
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor, nn

from ..files.images import ImageInputError, garment_tensor, tensor_to_image
from ..files.settings_model import Field, Settings, ValidationError, problems_of, validator
from ..sd.checkpoint import StableDiffusion
from ..sd.diffusion import diffusion_target, predicted_noise
from ..sd.sampling import ddim_sample
from ..sd.sdxl import SdxlText
from ..sd.training_patches import training_patches
from ..training.loop import PRECISIONS, RESUME_HELP, LoopSettings, MicroBatch, Progress, StepRecord, Trainer
from ..training.state import TrainingError
from .captions import read_captions, ss_tag_frequency, varied_caption
from .dataset import MIN_SIDE
from .kohya_lora import NETWORKS, TEXT_PREFIX, KohyaLoRA, lycoris_missing

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-]{0,99}$")
# What a resumed run must share with the saved one (besides the optimizer and the number of images).
RESUME_KEYS = (
    "rank",
    "alpha",
    "network",
    "train_text_encoder",
    "batch_size",
    "grad_accumulation",
    "resolution",
    "buckets",
    "seed",
    "mixed_precision",
    "noise_offset",
    "min_snr_gamma",
    "learning_rate",
    "lr_warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "cache_latents",
    "masked_loss",
    "caption_dropout",
    "shuffle_tags",
    "keep_tags",
    "reg_repeats",
)

# Settings by GPU memory (the rest of TrainConfig keeps its defaults). SD1.x at 512x512. SDXL at 1024x1024 in
# bf16: its VAE overflows in fp16 (kohya's --no_half_vae), and the 12 GB target (RTX 3060) has bf16; batch 1 on
# 12 GB. Every preset keeps the default optimizer, 8-bit AdamW when bitsandbytes is installed.
PRESETS: dict[str, dict[str, object]] = {
    "8 GB": {"batch_size": 1, "mixed_precision": "fp16", "gradient_checkpointing": True, "cache_latents": True,
             "resolution": 512},
    "12 GB": {"batch_size": 2, "mixed_precision": "fp16", "gradient_checkpointing": True, "cache_latents": True,
              "resolution": 512},
    "16+ GB": {"batch_size": 2, "mixed_precision": "fp16", "gradient_checkpointing": False, "cache_latents": True,
               "resolution": 512},
    "SDXL 12 GB": {"batch_size": 1, "mixed_precision": "bf16", "gradient_checkpointing": True, "cache_latents": True,
                   "resolution": 1024},
    "SDXL 16+ GB": {"batch_size": 2, "mixed_precision": "bf16", "gradient_checkpointing": True, "cache_latents": True,
                    "resolution": 1024},
}  # fmt: skip


class TrainConfig(Settings):
    """Everything a run needs besides the model; the headless command reads the same keys from TOML."""

    dataset_dir: Path
    output_dir: Path
    name: str
    resolution: int = 512
    buckets: bool = False  # aspect buckets (sides multiples of 64, about resolution^2 pixels) instead of squares
    rank: int = 16
    alpha: float = 8.0
    network: str = "lora"  # lora (our own), or locon / loha / lokr through the lycoris-lora package
    train_text_encoder: bool = False
    learning_rate: float = 1e-4
    text_encoder_lr: float = 5e-5
    lr_warmup_steps: int = 0
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    epochs: int = 10
    max_steps: int = 0  # optimizer steps; 0: epochs decide
    batch_size: int = 1
    grad_accumulation: int = 1
    mixed_precision: str = "fp32"  # auto, fp32, fp16 (CUDA only, with a loss scaler) or bf16
    optimizer: str = "adamw8bit"  # "adamw8bit" uses bitsandbytes when importable on CUDA, else AdamW
    cache_latents: bool = True
    gradient_checkpointing: bool = False
    sdpa: bool = True  # headless: SDPA attention; the WebUI passes False and keeps its own optimisation
    min_snr_gamma: float = 0.0  # 0: off; 5 is the usual value
    noise_offset: float = 0.0
    masked_loss: bool = True  # alpha channel = where the loss counts
    caption_dropout: float = Field(0.0, ge=0.0, le=1.0)  # share of steps an image is seen with the empty caption
    shuffle_tags: bool = False  # the caption's tags in a new order each step, after the first keep_tags
    keep_tags: int = Field(1, ge=0)  # leading tags never shuffled: the trigger word (and class word with 2)
    reg_dir: Path | None = None  # regularisation images (other garments of the class) + captions; None: none
    reg_repeats: int = Field(1, ge=1)  # how often each regularisation image may appear before the pool repeats
    tensorboard: bool = False  # also a TensorBoard event log in <output_dir>/<name>-tensorboard (needs the package)
    save_every_epochs: int = 1
    sample_every_epochs: int = 0  # 0: no samples
    sample_prompt: str = ""  # default: the first caption
    sample_steps: int = 20
    seed: int = 0
    devices: int = 1  # processes (GPUs) on this machine, through Fabric's DDP; torchrun's setting wins
    resume: str = "latest"  # latest: continue this name's saved state when there is one; no: start afresh
    overwrite: bool = False  # replace an existing <name>.safetensors
    base_model_name: str = ""

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise TrainingError(problems_of(e)) from e

    @validator("network")
    def _network_available(cls, value: str) -> str:
        """Checked with the settings, so a missing package stops a run before any model is loaded or lent."""
        if value not in NETWORKS:
            raise ValueError(f"must be one of {', '.join(NETWORKS)}")
        if missing := lycoris_missing(value):
            raise ValueError(missing)
        return value


@dataclass
class TrainResult:
    status: str  # "done", "interrupted" or "nan"
    message: str
    output: Path | None  # the final LoRA (done) or None
    last_checkpoint: Path | None  # the newest good LoRA file written
    step: int
    losses: list[float]
    samples: list[Path]
    skipped: list[str]  # dataset files that could not be used, with the reason
    notes: list[str] = field(default_factory=list)  # settings that work but are not what the model suits


@dataclass
class _Item:
    pixels: Tensor  # (3, H, W) in [-1, 1]
    mask: Tensor  # (H/8, W/8) latent-resolution weight in [0, 1]
    caption: str

    @property
    def size_hw(self) -> tuple[int, int]:
        """The image's (height, width): SDXL's conditioning takes it."""
        return tuple(self.pixels.shape[-2:])


def check_name(name: str) -> str:
    """The output name, refused (not rewritten) when it could leave the output folder or clash with the OS."""
    name = name.strip()
    if name.endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    if not NAME.match(name) or ".." in name:
        raise TrainingError(
            f"'{name}' is not a usable LoRA name: use letters, digits, space, '_', '-', '.', at most 100, "
            "starting with a letter or digit (no folders)"
        )
    return name


def train_lora(
    model: StableDiffusion,
    config: TrainConfig,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    stop: threading.Event | None = None,
    progress_bar: bool = False,
) -> TrainResult:
    """Train, save `<output_dir>/<name>.safetensors` (kohya format, ss_*/sshs_*/modelspec.* metadata).

    Raises TrainingError before touching the model when the run cannot start. Any exception during
    training propagates after the model has been restored.
    """
    name = check_name(config.name)
    _check_settings(config, model)
    output, state_path = run_files(config)
    if config.resume not in ("latest", "no"):
        state_path = Path(config.resume)
    resuming = config.resume != "no" and state_path.is_dir()
    if output.exists() and not config.overwrite and not resuming:
        raise TrainingError(f"'{output}' exists: choose another name or allow overwriting")
    if state_path.exists() and not resuming and not config.overwrite:
        raise TrainingError(f"a previous run's state '{state_path.name}' exists: resume it or allow overwriting")
    items, skipped = _load_dataset(config.dataset_dir, config)
    reg_items, reg_skipped = _load_dataset(config.reg_dir, config) if config.reg_dir else ([], [])
    config.output_dir.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # the LoRA's init is seeded without moving the user's RNG
        torch.manual_seed(config.seed)
        text_encoder = model.text_encoder if config.train_text_encoder else None
        lora = KohyaLoRA(model.unet, config.rank, config.alpha, text_encoder, config.network, sdxl=model.is_sdxl).to(
            model.device
        )
    with (
        _frozen(model),
        training_patches(model.unet, gradient_checkpointing=config.gradient_checkpointing, sdpa=config.sdpa),
    ):
        try:
            lora.install()
            data = items + reg_items, skipped + [f"regularisation {line}" for line in reg_skipped], len(reg_items)
            trainer = GarmentLoRATrainer(model, config, name, lora, data, on_progress, stop, progress_bar)
            if resuming:
                trainer.resume(str(state_path))
            result = trainer.train()
            result.notes = _notes(config, model)
            return result
        finally:
            lora.remove()


def run_files(config: TrainConfig) -> tuple[Path, Path]:
    """(the final LoRA file, the resume state folder) of a run: a UI can tell the user a run can resume."""
    name = check_name(config.name)
    return config.output_dir / f"{name}.safetensors", config.output_dir / f"{name}-state"


@contextmanager
def _frozen(model: StableDiffusion) -> Iterator[None]:
    """No base weight gets a gradient; requires_grad flags are put back exactly as found."""
    params = [p for module in model.modules().values() for p in module.parameters()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


class LoRALoss(nn.Module):
    """The LoRA (the trainables); forward: the masked diffusion loss of one batch of image indices."""

    def __init__(self, trainer: GarmentLoRATrainer, lora: KohyaLoRA) -> None:
        super().__init__()
        self.lora = lora
        self._trainer = [trainer]  # in a list: not a submodule, not in the state dict

    def forward(self, batch: list[int]) -> tuple[Tensor, dict[str, float]]:
        return self._trainer[0].batch_loss(batch), {}


class GarmentLoRATrainer(Trainer):
    def __init__(self, model, config, name, lora, data, on_progress, stop, progress_bar=False) -> None:
        """`data`: (the training images followed by the regularisation images, the files skipped, how many of the
        images are regularisation images)."""
        self.sd, self.config, self.name, self.lora = model, config, name, lora
        self.items, self.skipped, self.n_reg = data
        self.n_train = len(self.items) - self.n_reg
        self.batches = math.ceil((self.n_train + self.reg_per_epoch) / config.batch_size) if self.n_reg else (
            _batches_per_epoch(self.items, config.batch_size)
        )  # fmt: skip
        settings = LoopSettings(
            steps=0,
            accumulation=config.grad_accumulation,
            precision=config.mixed_precision,
            max_grad_norm=config.max_grad_norm,
            warmup_steps=config.lr_warmup_steps,
            seed=config.seed,
            device=str(model.device),
            devices=config.devices,
            log_dir=str(config.output_dir / f"{name}-tensorboard") if config.tensorboard else "",
        )
        super().__init__(settings, run_files(config)[1], stop=stop, on_progress=on_progress, progress_bar=progress_bar)
        per_process = math.ceil(self.batches / self.world)
        self.steps_per_epoch = math.ceil(per_process / config.grad_accumulation)
        epochs_steps = config.epochs * self.steps_per_epoch
        self.total = self.settings.steps = min(config.max_steps, epochs_steps) if config.max_steps else epochs_steps
        groups = [{"params": [p for k, p in self.lora.named_parameters() if TEXT_PREFIX not in k]}]
        if config.train_text_encoder:
            te = [p for k, p in self.lora.named_parameters() if TEXT_PREFIX in k]
            groups.append({"params": te, "lr": config.text_encoder_lr})
        optimizer, self.optimizer_name = _optimizer(groups, config, self.device)
        self.setup(LoRALoss(self, lora), optimizer)
        self.samples: list[Path] = []
        self.started = datetime.now(timezone.utc)
        self.latents: list[Tensor] | None = None  # cached by _prepare, with the contexts
        self.conditions: list[dict[str, Tensor]] | None = None
        self.token_ids = None if model.is_sdxl else model.tokenize([item.caption for item in self.items])

    # --- the loop ---------------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        if not self._prepare():
            message = f"interrupted while preparing the data, before step {self.step + 1}; nothing new was saved"
            return self._result("interrupted", message)
        status = self.fit()
        if status == "nan":
            return self._result("nan", self.message)
        if status == "interrupted":
            return self._interrupted()
        self.lora.save(self.output_path, self._metadata(final=True))
        shutil.rmtree(self.state_dir, ignore_errors=True)  # the run is complete: nothing left to resume
        self.last_checkpoint = self.output_path
        return self._result("done", f"saved {self.output_path.name} after {self.step} steps", self.output_path)

    def micro_batches(self) -> Iterator[MicroBatch]:
        """Each epoch's batches (this process's share), from the step reached; a step gathers
        `grad_accumulation` batches, the epoch's last step may gather fewer."""
        accumulation = self.config.grad_accumulation
        while True:
            epoch = self.step // self.steps_per_epoch
            order = self._epoch_order(epoch)
            micro = 0
            for index in range(self.step % self.steps_per_epoch * accumulation, len(order)):
                micro += 1
                last = index + 1 == len(order)
                closes = micro == accumulation or last
                micro = 0 if closes else micro
                yield MicroBatch(order[index], closes_step=closes, epoch=epoch + 1, ends_epoch=last)

    def after_step(self, record: StepRecord) -> Path | None:
        return self._epoch_end(record.epoch) if record.ends_epoch else None

    def _result(self, status: str, message: str, output: Path | None = None) -> TrainResult:
        return TrainResult(
            status, message, output, self.last_checkpoint, self.step, self.losses, self.samples, self.skipped
        )

    def batch_loss(self, batch: list[int]) -> Tensor:
        """The masked diffusion loss of one batch (min-SNR weighted when asked)."""
        model, config, gen = self.sd, self.config, self.generator
        with torch.no_grad():
            if self.latents is not None:
                latents = torch.stack([self.latents[i] for i in batch]).to(self.device)
            else:
                pixels = torch.stack([self.items[i].pixels for i in batch])
                with self.autocast():
                    latents = model.encode_images(pixels, generator=gen).float()
        noise = torch.randn(latents.shape, generator=gen)
        if config.noise_offset:
            noise = noise + config.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=gen)
        noise = noise.to(self.device)
        timesteps = torch.randint(0, len(model.alphas_cumprod), (len(batch),), generator=gen)
        abar = model.alphas_cumprod[timesteps].to(self.device, torch.float32).view(-1, 1, 1, 1)
        noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
        target = diffusion_target(latents, noise, abar, model.prediction)
        with self.autocast():
            cond = self._conditioning(batch)
            pred = model.unet(noisy.to(self._unet_dtype()), timesteps.to(self.device), **cond)
        mask = torch.stack([self.items[i].mask for i in batch]).to(self.device)
        weights = snr_weights(abar.view(-1), config.min_snr_gamma, model.prediction)
        return masked_mse(pred.float(), target, mask if config.masked_loss else None, weights)

    def _conditioning(self, batch: list[int]) -> dict[str, Tensor]:
        """The batch's text inputs to the UNet: cached, or encoded now (varied captions, a text-encoder LoRA)."""
        if self.conditions is not None:
            return {k: torch.stack([self.conditions[i][k] for i in batch]).to(self.device) for k in self.conditions[0]}
        size_hw = self.items[batch[0]].size_hw  # a batch is one size (buckets never mix)
        if self.varied_captions or self.token_ids is None:  # SDXL conditions on the caption strings
            return self.sd.unet_conditioning([self._step_caption(self.items[i].caption) for i in batch], size_hw)
        return self.sd.unet_conditioning(self.token_ids[batch], size_hw)

    @property
    def varied_captions(self) -> bool:
        return bool(self.config.caption_dropout) or self.config.shuffle_tags

    def _step_caption(self, caption: str) -> str:
        c = self.config
        return varied_caption(
            caption, self.generator, dropout=c.caption_dropout, shuffle=c.shuffle_tags, keep=c.keep_tags
        )

    def _epoch_end(self, epoch: int) -> Path | None:
        config = self.config
        every = config.save_every_epochs
        if every and (epoch % every == 0) and self.step < self.total:
            path = config.output_dir / f"{self.name}-{epoch:06d}.safetensors"
            if self.rank == 0:
                self.lora.save(path, self._metadata(final=False, epoch=epoch))
            self.last_checkpoint = path
            self.save_state()
        if config.sample_every_epochs and epoch % config.sample_every_epochs == 0 and self.rank == 0:
            return self._sample(epoch)
        return None

    def _interrupted(self) -> TrainResult:
        path = self.config.output_dir / f"{self.name}-step{self.step:06d}.safetensors"
        if self.rank == 0:
            self.lora.save(path, self._metadata(final=False))
        self.last_checkpoint = path
        self.save_state()
        message = f"interrupted at step {self.step}/{self.total}; resume continues from there ({path.name} saved)"
        return self._result("interrupted", message)

    # --- state --------------------------------------------------------------------------------------------

    @property
    def output_path(self) -> Path:
        return run_files(self.config)[0]

    def fingerprint(self) -> dict[str, object]:
        """What shapes the LoRA, the batches, the random draws (noise offset, latents encoded per step or
        cached), the loss and the updates; epochs and max_steps may change."""
        config = self.config
        values = {k: getattr(config, k) for k in RESUME_KEYS}
        values["text_encoder_lr"] = config.text_encoder_lr if config.train_text_encoder else None
        values["reg_dir"] = str(config.reg_dir or "")
        return {**values, "optimizer": self.optimizer_name, "images": self.n_train, "reg_images": self.n_reg}

    # --- data -----------------------------------------------------------------------------------------------

    def _epoch_order(self, epoch: int) -> list[list[int]]:
        """The epoch's batches: shuffled within same-size groups (buckets), then shuffled; seeded per epoch,
        so a resumed run rebuilds the same order."""
        gen = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
        groups: dict[tuple[int, int], list[int]] = {}
        for i in [*range(self.n_train), *self._epoch_reg(gen)]:
            groups.setdefault(tuple(self.items[i].pixels.shape[1:]), []).append(i)
        batches = []
        for members in groups.values():
            shuffled = [members[j] for j in torch.randperm(len(members), generator=gen).tolist()]
            size = self.config.batch_size
            batches += [shuffled[k : k + size] for k in range(0, len(shuffled), size)]
        batches = [batches[j] for j in torch.randperm(len(batches), generator=gen).tolist()]
        per_process = math.ceil(len(batches) / self.world)
        padded = (batches * self.world)[: per_process * self.world]  # equal shares: every process steps alike
        return padded[self.rank :: self.world]

    @property
    def reg_per_epoch(self) -> int:
        """Regularisation images per epoch: as many as training images, at most each one `reg_repeats` times."""
        return min(self.n_train, self.n_reg * self.config.reg_repeats)

    def _epoch_reg(self, gen: torch.Generator) -> list[int]:
        """This epoch's regularisation images: drawn without replacement from the folder repeated reg_repeats times."""
        if not self.n_reg:
            return []
        pool = [self.n_train + i for i in range(self.n_reg)] * self.config.reg_repeats
        return [pool[j] for j in torch.randperm(len(pool), generator=gen)[: self.reg_per_epoch].tolist()]

    def _prepare(self) -> bool:
        """Cache the latents and caption contexts the run reuses; False when stopped meanwhile (this can take
        minutes, and in the WebUI the queue waits on it)."""
        if self.config.cache_latents:
            self.latents = self._cache_latents()
        if not self.config.train_text_encoder and not self.varied_captions:  # varied captions: encoded per step
            self.conditions = self._encode_captions()
        return not self.stop.is_set()

    def _until_stopped(self) -> Iterator[_Item]:
        return itertools.takewhile(lambda _: not self.stop.is_set(), self.items)

    @torch.no_grad()
    def _cache_latents(self) -> list[Tensor]:
        gen = torch.Generator().manual_seed(self.config.seed + 1)
        with self.autocast():
            return [
                self.sd.encode_images(item.pixels[None], generator=gen)[0].float().cpu()
                for item in self._until_stopped()
            ]

    @torch.no_grad()
    def _encode_captions(self) -> list[dict[str, Tensor]]:
        with self.autocast():
            return [
                {k: v[0].cpu() for k, v in self.sd.unet_conditioning([item.caption], item.size_hw).items()}
                for item in self._until_stopped()
            ]

    def _unet_dtype(self) -> torch.dtype:
        return next(self.sd.unet.parameters()).dtype

    # --- outputs ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _sample(self, epoch: int) -> Path:
        model, config = self.sd, self.config
        prompt = config.sample_prompt or self.items[0].caption
        side = config.resolution // 8
        noise = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(config.seed)).to(self.device)
        with self.autocast():
            cond, uncond = (model.unet_conditioning([text], (config.resolution,) * 2) for text in (prompt, ""))
            both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
            abar = model.alphas_cumprod.to(self.device, torch.float32)

            def eps(x: Tensor, t: Tensor) -> Tensor:
                out = model.unet(x.to(self._unet_dtype()), t, **both).float()
                return predicted_noise(out, x, abar[t.long()], model.prediction)

            latents = ddim_sample(eps, noise, steps=config.sample_steps, guidance=7.0)
            image = model.decode_latents(latents)[0].float()
        folder = config.output_dir / f"{self.name}-samples"
        folder.mkdir(exist_ok=True)
        path = folder / f"epoch{epoch:04d}.png"
        tensor_to_image(image).save(path)
        self.samples.append(path)
        return path

    def _metadata(self, *, final: bool, epoch: int | None = None) -> dict[str, str]:
        config, model = self.config, self.sd
        epoch = epoch or math.ceil(self.step / self.steps_per_epoch)
        side = config.resolution
        values = {
            "ss_output_name": self.name,
            "ss_sd_model_name": config.base_model_name,
            "ss_v2": "False",
            "ss_resolution": f"({side}, {side})",
            "ss_enable_bucket": str(config.buckets),
            "ss_num_train_images": str(self.n_train),
            "ss_num_reg_images": str(self.n_reg),
            "ss_num_batches_per_epoch": str(self.batches),
            "ss_num_epochs": str(math.ceil(self.total / self.steps_per_epoch)),
            "ss_epoch": str(epoch),
            "ss_steps": str(self.step),
            "ss_max_train_steps": str(self.total),
            "ss_learning_rate": str(config.learning_rate),
            "ss_unet_lr": str(config.learning_rate),
            "ss_text_encoder_lr": str(config.text_encoder_lr if config.train_text_encoder else 0.0),
            "ss_lr_scheduler": "constant_with_warmup" if config.lr_warmup_steps else "constant",
            "ss_lr_warmup_steps": str(config.lr_warmup_steps),
            "ss_optimizer": self.optimizer_name,
            "ss_batch_size_per_device": str(config.batch_size),
            "ss_gradient_accumulation_steps": str(config.grad_accumulation),
            "ss_total_batch_size": str(config.batch_size * config.grad_accumulation),
            "ss_mixed_precision": {"fp32": "no"}.get(self.precision, self.precision),
            "ss_gradient_checkpointing": str(config.gradient_checkpointing),
            "ss_cache_latents": str(config.cache_latents),
            "ss_min_snr_gamma": str(config.min_snr_gamma or None),
            "ss_noise_offset": str(config.noise_offset or None),
            "ss_max_grad_norm": str(config.max_grad_norm),
            "ss_clip_skip": str(model.clip_skip),
            "ss_seed": str(config.seed),
            "ss_masked_loss": str(config.masked_loss),
            "ss_caption_dropout_rate": str(config.caption_dropout),
            "ss_shuffle_caption": str(config.shuffle_tags),
            "ss_keep_tokens": str(config.keep_tags),
            "ss_training_started_at": str(self.started.timestamp()),
            "ss_training_finished_at": str(datetime.now(timezone.utc).timestamp()) if final else "",
            "ss_tag_frequency": ss_tag_frequency(config.dataset_dir),
            "modelspec.date": self.started.date().isoformat(),
            "modelspec.resolution": f"{side}x{side}",
            "modelspec.prediction_type": "epsilon" if model.prediction == "eps" else "v",
            "modelspec.title": self.name,
        }
        return values


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor | None, weights: Tensor | None = None) -> Tensor:
    """Mean squared error per sample over the mask's area (every channel), weighted per sample, then averaged.

    `mask` (B, h, w) in [0, 1] at latent resolution; None: every position counts.
    """
    error = (pred - target).square().mean(dim=1)  # (B, h, w): over channels
    if mask is None:
        per_sample = error.mean(dim=(1, 2))
    else:
        per_sample = (error * mask).sum(dim=(1, 2)) / mask.sum(dim=(1, 2)).clamp_min(1e-6)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()


def snr_weights(abar: Tensor, gamma: float, prediction: str) -> Tensor | None:
    """Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v; None when off."""
    if not gamma:
        return None
    snr = abar / (1 - abar)
    return snr.clamp(max=gamma) / (snr if prediction == "eps" else snr + 1)


def _check_settings(config: TrainConfig, model: StableDiffusion) -> None:
    problems = _model_problems(config, model)
    if config.mixed_precision not in PRECISIONS:
        problems.append(f"mixed_precision must be one of {', '.join(PRECISIONS)}")
    if config.resume not in ("latest", "no") and not Path(config.resume).is_dir():
        problems.append(f"resume must be {RESUME_HELP}")
    if config.reg_dir and config.buckets:
        problems.append("regularisation images need square training: turn aspect buckets off")
    if config.resolution % 64 or config.resolution < 64:
        problems.append("resolution must be a multiple of 64")
    for key in ("rank", "epochs", "batch_size", "grad_accumulation"):
        if getattr(config, key) < 1:
            problems.append(f"{key} must be at least 1")
    if config.learning_rate <= 0 or config.alpha <= 0:
        problems.append("learning_rate and alpha must be positive")
    if config.optimizer not in ("adamw", "adamw8bit"):
        problems.append("optimizer must be adamw or adamw8bit")
    if problems:
        raise TrainingError("; ".join(problems))


def _model_problems(config: TrainConfig, model: StableDiffusion) -> list[str]:
    """The settings this model (its device, dtype, family) cannot train with."""
    problems = []
    if config.mixed_precision == "fp16" and model.device.type != "cuda":
        problems.append("fp16 mixed precision needs a CUDA GPU; use bf16 or fp32")
    dtype = next(model.unet.parameters()).dtype
    if dtype != torch.float32 and config.mixed_precision == "fp32":
        problems.append(f"the model is in {dtype}: choose fp16 or bf16 mixed precision")
    if model.is_sdxl and config.train_text_encoder and not isinstance(model.text_encoder, SdxlText):
        problems.append(
            "a text-encoder LoRA on SDXL trains headless for now (train-lora on the checkpoint file): here, train "
            "the UNet LoRA only"
        )
    return problems


def _notes(config: TrainConfig, model: StableDiffusion) -> list[str]:
    if model.is_sdxl and config.resolution < 1024:
        return [
            f"SDXL was trained at {config.resolution} px: it generates around 1024 px, where a LoRA trained at "
            "1024 holds the garment's detail better"
        ]
    return []


def _optimizer(groups: list[dict], config: TrainConfig, device: torch.device):
    if config.optimizer == "adamw8bit" and device.type == "cuda":
        try:
            import bitsandbytes as bnb

            opt = bnb.optim.AdamW8bit(groups, lr=config.learning_rate, weight_decay=config.weight_decay)
            return opt, "bitsandbytes.optim.AdamW8bit"
        except ImportError:
            pass
    return torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay), "torch.optim.AdamW"


def _batches_per_epoch(items: list[_Item], batch_size: int) -> int:
    sizes: dict[tuple[int, ...], int] = {}
    for item in items:
        sizes[tuple(item.pixels.shape)] = sizes.get(tuple(item.pixels.shape), 0) + 1
    return sum(math.ceil(n / batch_size) for n in sizes.values())


def bucket_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """About resolution^2 pixels at the photo's aspect ratio, sides multiples of 64 (at most 2 x resolution)."""
    scale = resolution / math.sqrt(width * height)
    side = lambda n: int(min(2 * resolution, max(64, round(n * scale / 64) * 64)))  # noqa: E731
    return side(width), side(height)


def _load_dataset(folder: Path, config: TrainConfig) -> tuple[list[_Item], list[str]]:
    """Every image with its caption; unusable files are listed with the reason, not fatal unless none is left."""
    if not folder.is_dir():
        raise TrainingError(f"the dataset folder '{folder}' does not exist")
    items, skipped = [], []
    for path, caption in read_captions(folder).items():
        try:
            with Image.open(path) as image:
                if min(image.size) < MIN_SIDE:
                    raise ImageInputError(f"{image.width}x{image.height} is too small (at least {MIN_SIDE} px a side)")
                image.load()
                size = (config.resolution,) * 2
                if config.buckets:
                    size = bucket_size(image.width, image.height, config.resolution)
                pixels, mask = garment_tensor(image, size)
        except (ImageInputError, UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as e:
            skipped.append(f"{path.name}: {e}")
            continue
        if mask is None:
            mask = torch.ones(pixels.shape[1:])
        latent_mask = F.avg_pool2d(mask[None, None], 8)[0, 0]  # the share of each latent cell inside the garment
        if latent_mask.sum() == 0:
            skipped.append(f"{path.name}: the alpha channel is empty (nothing to learn)")
            continue
        items.append(_Item(pixels, latent_mask, caption))
    if not items:
        detail = f" ({'; '.join(skipped)})" if skipped else ""
        raise TrainingError(f"'{folder}' has no usable images{detail}")
    return items, skipped
