"""The AnyDressing trainer: GarmentsNet (+ per-slot GFE LoRAs) and the Dressing-Attention projections,
trained with L_LDM + (lambda1 / m) L_loc + lambda2 L_texture (docs/method.md LOSS; the terms are in losses.py).

GarmentsNet is a separate copy of the SD UNet with its cross-attention skipped; DressingNet is the SD
UNet itself, frozen, dressed by a Dresser in additive mode whose K'/V' are recomputed at every forward
(the projections train). The VAE, text encoder and DressingNet get no gradient and are never written.
Each sample is its own forward: one Dresser call shares one garment set across its rows, and samples
carry different garments, so a batch is gradient accumulation over samples. The loop (precision,
accumulation, several processes, resume state) is the shared one of training/loop.py; the loss of one
sample is the forward of `DressingLoss`, the module DDP wraps.

Randomness (timesteps, noise, latent sampling, dropout, data order) comes from the loop's generator, whose
state is saved with the weights and the optimizer, so a resumed run takes the same steps as an
uninterrupted one (equal up to float rounding: README, What resume guarantees).
"""

from __future__ import annotations

import contextlib
import csv
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..engine import (
    AnyDressingModel,
    Dresser,
    DressingProjections,
    GarmentFeatures,
    GarmentLoRA,
    GarmentsNet,
    ModelInfo,
    architecture,
    save_checkpoint,
    self_attention_layers,
)
from ..sd.checkpoint import StableDiffusion, load_sd_checkpoint
from ..sd.diffusion import diffusion_target, predicted_noise
from ..sd.training_patches import training_patches
from ..training.loop import LoopSettings, MicroBatch, StepRecord, Trainer
from ..training.state import TrainingError
from .config import TrainConfig
from .dists import DISTS, load_dists
from .losses import LossSwitches, TextureTarget, ldm_loss, localization_loss, texture_loss

log = logging.getLogger(__name__)
LOG_COLUMNS = ("step", "loss", "ldm", "loc", "perc", "hf", "texture_samples", "seconds")
STATE_DIR = "state"
TEXT_CACHE = 1024  # caption embeddings kept: 77 x 768 floats each, ~240 MB in fp32 at most
TERMS = ("ldm", "loc", "perc", "hf")


@dataclass
class StepLosses:
    """One sample's loss terms (unweighted) and the weighted total."""

    total: Tensor
    ldm: Tensor
    loc: Tensor
    perc: Tensor
    hf: Tensor
    texture: bool  # t <= eta and garments present: GTL counted

    def values(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("total", "ldm", "loc", "perc", "hf")}


class DressingLoss(nn.ModuleDict):
    """The trainables (GarmentsNet, GFE LoRAs, DA projections); forward: one sample's weighted loss and its terms.

    This is the module DDP wraps, so every trainable is a submodule; the frozen model stays outside it.
    """

    def __init__(self, trainer: AnyDressingTrainer, modules: dict[str, nn.Module]) -> None:
        super().__init__(modules)
        self._trainer = [trainer]  # in a list: not a submodule, not in the state dict

    def forward(self, item: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        result = self._trainer[0].sample_losses(item)
        terms = {k: float(getattr(result, k).detach()) for k in TERMS}
        return result.total, {**terms, "texture_samples": float(result.texture)}


class AnyDressingTrainer(Trainer):
    """Builds the trainable model around a StableDiffusion and runs optimisation steps over a dataset.

    The trainer owns `sd`: it moves it to the training device and, under mixed precision, stores its
    frozen weights in the autocast dtype; it never changes their values.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        sd: StableDiffusion | None = None,
        dataset: Any = None,
        *,
        dists: DISTS | None = None,
        say: Callable[[str], None] = print,
        progress_bar: bool = False,
    ) -> None:
        self.cfg = cfg
        self.say = say
        settings = LoopSettings(
            steps=cfg.steps,
            accumulation=cfg.gradient_accumulation,
            precision=cfg.mixed_precision,
            max_grad_norm=cfg.max_grad_norm,
            warmup_steps=cfg.warmup_steps,
            seed=cfg.seed,
            device=cfg.device,
            devices=cfg.devices,
            log_dir=str(Path(cfg.output_dir) / "tensorboard") if cfg.tensorboard else "",
        )
        super().__init__(settings, Path(cfg.output_dir) / STATE_DIR, progress_bar=progress_bar)
        torch.manual_seed(cfg.seed)  # LoRA initialisation
        self.sd = sd if sd is not None else load_sd_checkpoint(cfg.sd_checkpoint, tokenizer=cfg.tokenizer or None)
        unet = self.sd.unet
        self.layers = self_attention_layers(unet)
        dims = {layer.name: (layer.dim, layer.inner_dim) for layer in self.layers}
        skip = tuple(f"{layer.name}.attn2." for layer in self.layers)  # GarmentsNet has no cross-attention
        weights = {k: v.detach().clone().float() for k, v in unet.state_dict().items() if not k.startswith(skip)}
        lora = GarmentLoRA(dims, n_slots=len(cfg.slots), rank=cfg.lora_rank, alpha=cfg.lora_alpha)
        self.garments_net = GarmentsNet.from_state_dict(unet, weights, lora=lora, tap="attn_output")
        self.projections = DressingProjections.from_unet(unet).float()
        modules = {"garments_net": self.garments_net.unet, "lora": lora, "da": self.projections}
        self.trainable = DressingLoss(self, modules)
        self.trainable.to(self.device).requires_grad_(True).train()
        frozen_dtype = self.amp_dtype or torch.float32  # frozen weights stored in the autocast dtype
        for module in self.sd.modules().values():
            module.to(self.device, frozen_dtype).requires_grad_(False).eval()
        optimizer = torch.optim.AdamW(
            [p for p in self.trainable.parameters() if p.requires_grad],
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            foreach=True,  # one kernel per group, not per tensor (torch picks per-tensor on CPU by default)
        )
        self.setup(self.trainable, optimizer)
        self.switches = LossSwitches(
            cfg.loss_ldm, cfg.loss_loc, cfg.loss_perc, cfg.loss_hf, cfg.lambda_loc, cfg.lambda_texture, cfg.eta
        )
        self.dists = self._dists(dists)
        if self.dists is not None:
            self.dists.to(self.device)
        self.dataset = dataset
        self.output = Path(cfg.output_dir)
        self._contexts: OrderedDict[str, Tensor] = OrderedDict()  # caption -> embedding (`_text`)

    # --- setup ------------------------------------------------------------------------------------

    def _dists(self, given: DISTS | None) -> DISTS | None:
        """The DISTS of L_perc: None when the term is off (even if one is given), else `given` or the config's."""
        if not self.cfg.loss_perc:
            return None
        if given is not None:
            return given
        if not self.cfg.vgg16_weights:
            self.say("no vgg16_weights in the config: DISTS cannot run, training without L_perc (GTL keeps L_hf)")
            return None
        model = load_dists(self.cfg.vgg16_weights, self.cfg.dists_weights or None)
        if not model.fitted:
            self.say(
                "DISTS alpha/beta: no dists_weights file, and neither torchmetrics (>= 1.7) nor DISTS_pytorch "
                "is installed: using uniform weights"
            )
        return model

    @property
    def n_da_layers(self) -> int:
        return len(self.layers)

    # --- one sample -------------------------------------------------------------------------------

    def sample_losses(self, item: dict[str, Any]) -> StepLosses:
        """Losses of one dataset item. Call inside `patched()` and `loss_scope()`: the Dresser stays in the
        scope until after the backward pass, which the recomputation of checkpointed blocks needs."""
        gen, dev = self.generator, self.device
        person = item["person"][None].to(dev)
        masks = item["masks"][None].to(dev)
        u = float(torch.rand((), generator=gen))
        drop_text = u < self.cfg.uncond_dropout + self.cfg.caption_dropout
        drop_garments = u < self.cfg.uncond_dropout or (
            self.cfg.uncond_dropout + self.cfg.caption_dropout
            <= u
            < self.cfg.uncond_dropout + self.cfg.caption_dropout + self.cfg.garment_dropout
        )
        z0, garment_latents = self._latents(item, person)
        t = torch.randint(0, len(self.sd.alphas_cumprod), (1,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen).to(dev, z0.dtype)
        abar = self.sd.alphas_cumprod[t].to(dev, torch.float32)
        z_t = abar.sqrt().view(-1, 1, 1, 1) * z0 + (1 - abar).sqrt().view(-1, 1, 1, 1) * noise
        t_dev = t.to(dev)
        with torch.no_grad(), self.autocast():
            context = self._text("" if drop_text else item["caption"])
        zero = torch.zeros((), device=dev)
        with self.autocast():
            dresser = None
            if not drop_garments:
                features = self._features(garment_latents, item["slots"])
                dresser = Dresser(
                    self.sd.unet,
                    features,
                    self.projections,
                    strength=self.cfg.da_strength,
                    record_attention_mass=self.switches.loc,
                    recompute_kv=True,
                )
                self.scope.enter_context(dresser)
            pred = self.sd.unet(z_t, t_dev.float(), context=context).float()
            target = diffusion_target(z0, noise, abar, self.sd.prediction)
            l_ldm = ldm_loss(pred, target) if self.switches.ldm else zero
            l_loc = perc = hf = zero
            if dresser is not None and self.switches.loc:
                l_loc = localization_loss(dresser.attention_mass, masks, tuple(z0.shape[-2:]))
            textured = self.dists is not None or self.switches.hf
            texture = dresser is not None and int(t) <= self.switches.eta and textured
            if dresser is not None:
                eps = predicted_noise(pred, z_t, abar, self.sd.prediction)
                perc, hf = texture_loss(
                    self.sd.decode_latents,
                    z_t,
                    eps,
                    abar,
                    t_dev,
                    TextureTarget(person, masks, item["edges"][None].to(dev)),
                    eta=self.switches.eta,
                    dists=self.dists,
                    hf=self.switches.hf,
                )
            sw = self.switches
            total = l_ldm + sw.lambda_loc / self.n_da_layers * l_loc + sw.lambda_texture * (perc + hf)
        return StepLosses(total, l_ldm, l_loc, perc, hf, texture)

    def _text(self, caption: str) -> Tensor:
        """The frozen text encoder's (1, 77, D) embedding, kept for the last TEXT_CACHE captions (an epoch
        repeats every caption, and caption dropout the empty one at most steps)."""
        if caption in self._contexts:
            self._contexts.move_to_end(caption)
            return self._contexts[caption]
        context = self._contexts[caption] = self.sd.encode_text([caption])
        if len(self._contexts) > TEXT_CACHE:
            self._contexts.popitem(last=False)
        return context

    def _features(self, latents: Tensor, slots: Tensor) -> GarmentFeatures:
        """GarmentsNet at t=0 with gradient; checkpointed as a whole (its patches live only inside extract)."""
        slot_list = [int(s) for s in slots]
        names = [layer.name for layer in self.garments_net.layers]
        if not self.cfg.gradient_checkpointing:
            return self.garments_net.extract(latents, slots=slot_list, dtype=torch.float32)

        def run(x: Tensor) -> tuple[Tensor, ...]:
            per_layer = self.garments_net.extract(x, slots=slot_list, dtype=torch.float32).per_layer
            return tuple(per_layer[n] for n in names)

        out = checkpoint(run, latents, use_reentrant=False)
        return GarmentFeatures(dict(zip(names, out, strict=True)), latents.shape[0])

    def _latents(self, item: dict[str, Any], person: Tensor) -> tuple[Tensor, Tensor]:
        """(person latent sampled from the VAE posterior, garment latents = posterior means), no grad."""
        with torch.no_grad(), self.autocast():
            cached = self._cache_path(item) if self.cfg.cache_latents else None
            if cached is not None and cached.is_file():
                stored = load_file(str(cached))
                mean, std, garments = (stored[k].to(self.device) for k in ("mean", "std", "garments"))
            else:
                vae_dtype = next(self.sd.vae.parameters()).dtype
                posterior = self.sd.vae.encode(person.to(vae_dtype))
                mean, std = posterior.mean.float(), posterior.std.float()
                garments = self.sd.encode_images(item["garments"].to(self.device)).float()
                if cached is not None:
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    tensors = {"mean": mean, "std": std, "garments": garments}
                    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(cached))
            noise = torch.randn(mean.shape, generator=self.generator).to(self.device)
            return (mean + std * noise) * self.sd.latent_scale, garments

    def _cache_path(self, item: dict[str, Any]) -> Path:
        h, w = self.cfg.size
        gh, gw = self.cfg.garment_size
        name = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(item["id"]))
        return self.output / "latent_cache" / f"{h}x{w}_{gh}x{gw}" / f"{name}.safetensors"

    # --- the loop -----------------------------------------------------------------------------------

    def train(self, steps: int | None = None) -> int:
        """Run until `steps` optimizer steps (default: the config's) are done; returns the step reached."""
        if self.dataset is None:
            raise TrainingError("no dataset")
        self.settings.steps = self.cfg.steps if steps is None else steps
        self.resume(self.cfg.resume)
        with self.patched():
            if self.fit() == "nan":
                raise TrainingError(self.message)
        return self.step

    def micro_batches(self) -> Iterator[MicroBatch]:
        """The dataset's samples in order, `gradient_accumulation` to a step."""
        per_step = self.cfg.gradient_accumulation
        for position, item in enumerate(self.items(), start=1):
            yield MicroBatch(item, closes_step=position % per_step == 0)

    def after_step(self, record: StepRecord) -> Path | None:
        """The log row; the model file and state every save_every steps and at the end; a sample grid."""
        row = {"step": record.step, "loss": record.loss}
        row.update({k: record.terms[k] / record.micro_batches for k in TERMS})
        row.update(texture_samples=int(record.terms["texture_samples"]), seconds=record.seconds)
        self._log(row)
        if self.step % self.cfg.save_every == 0 or self.step == self.settings.steps:
            self.save()
        if self.cfg.sample_every and self.step % self.cfg.sample_every == 0:
            return self.sample_grid()
        return None

    def fingerprint(self) -> dict[str, object]:
        c = self.cfg
        keys = ("slots", "lora_rank", "lora_alpha", "da_strength", "size", "garment_size", "max_garments", "lr")
        keys += ("weight_decay", "uncond_dropout", "caption_dropout", "garment_dropout", "loss_ldm", "loss_loc")
        keys += ("loss_perc", "loss_hf", "lambda_loc", "lambda_texture", "eta", "gradient_accumulation")
        keys += ("mixed_precision", "seed", "max_grad_norm", "warmup_steps")
        return {**{k: getattr(c, k) for k in keys}, "samples": len(self.dataset), "perc": self.dists is not None}

    def items(self) -> Iterator[dict[str, Any]]:
        """The dataset in a seeded order, reshuffled each epoch, starting where `self.step` left off."""
        from torch.utils.data import DataLoader

        per_step = self.cfg.gradient_accumulation
        sampler = _EpochOrder(len(self.dataset), self.cfg.seed, self.step * per_step, self.rank, self.world)
        workers = self.cfg.num_workers if self.device.type == "cuda" else 0
        loader = DataLoader(self.dataset, batch_size=None, sampler=sampler, num_workers=workers)
        return iter(loader)

    @contextlib.contextmanager
    def patched(self):
        """Both UNets set up for training steps, and put back exactly afterwards (garment_lora's patches).

        ldm's own checkpoint flags go off: its checkpoint differentiates only a block's own parameters
        and would drop the gradients of the DA projections, the GFE LoRAs and GarmentsNet. With
        `gradient_checkpointing`, torch's non-reentrant checkpoint wraps DressingNet's transformer blocks
        and ResBlocks (GarmentsNet is checkpointed as a whole in `_features`). SDPA replaces ldm's einsum
        attention in both, which would otherwise hold every attention matrix for the backward pass.
        """
        with (
            training_patches(self.sd.unet, gradient_checkpointing=self.cfg.gradient_checkpointing, sdpa=True),
            training_patches(self.garments_net.unet, gradient_checkpointing=False, sdpa=True),
        ):
            yield

    def _log(self, row: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        path = self.output / "loss_log.csv"
        self.output.mkdir(parents=True, exist_ok=True)
        new = not path.is_file()
        with path.open("a", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
        if self.step % self.cfg.log_every == 0:
            terms = " ".join(f"{k} {row[k]:.4g}" for k in ("ldm", "loc", "perc", "hf"))
            self.say(f"step {self.step}/{self.cfg.steps}: loss {row['loss']:.4g} ({terms}), {row['seconds']:.2f} s")

    # --- checkpoints and resume ---------------------------------------------------------------------

    def anydressing_model(self) -> AnyDressingModel:
        """The current weights in the extension's checkpoint format (what the WebUI loads)."""
        lora = self.trainable["lora"]
        info = ModelInfo(
            base=architecture(self.sd.unet),
            slots=list(self.cfg.slots),
            lora_rank=lora.rank,
            lora_alpha=float(lora.alpha),
            tap="attn_output",
            cross_attention="skip",
            default_strength=0.7,
            origin=f"anydressing trainer, step {self.step}",
            recommended={"sampler": "DDIM", "steps": 30, "guidance": 6.0, "strength": 0.7},
        )
        return AnyDressingModel(
            info,
            projections=self.projections,
            lora=lora,
            garments_net_weights=self.garments_net.unet.state_dict(),
        )

    def save(self) -> Path | None:
        """The model file (models/anydressing_stepXXXXXXX.safetensors, process 0) and the resume state, each
        replaced only once complete. Returns the model file."""
        path = None
        if self.rank == 0:
            models = self.output / "models"
            models.mkdir(parents=True, exist_ok=True)
            path = models / f"anydressing_step{self.step:07d}.safetensors"
            tmp = path.with_suffix(".tmp")
            save_checkpoint(self.anydressing_model(), tmp)
            tmp.replace(path)
            self.last_checkpoint = path
            if self.cfg.keep_checkpoints:
                for old in sorted(models.glob("anydressing_step*.safetensors"))[: -self.cfg.keep_checkpoints]:
                    old.unlink()
        self.save_state()
        return path

    def resume(self, where: str) -> bool:
        if not super().resume(where):
            return False
        if self.resumed_with_fresh_scaler:  # saved with bf16 or fp32: fp16 finds its own scale in a few steps
            self.say("resume: the state has no fp16 loss scale (saved without fp16); starting it afresh")
        self._truncate_log()
        self.say(f"resumed from '{self.state_dir if where == 'latest' else where}' at step {self.step}")
        return True

    def _truncate_log(self) -> None:
        """Rows logged after the state being resumed were never kept: drop them so steps do not repeat."""
        path = self.output / "loss_log.csv"
        if self.rank != 0 or not path.is_file():
            return
        with path.open(newline="", encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= self.step]
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    # --- samples ------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample_grid(self, index: int = 0, guidance: float = 6.0) -> Path | None:
        """garments | target | generated (DDIM, eq. 16 guidance, lambda 0.7) for one dataset item, as a PNG."""
        from ..sd.sampling import ddim_sample, guidance_layout

        if self.rank != 0:
            return None
        item = self.dataset[index]
        person = item["person"][None].to(self.device)
        with self.autocast():
            garments = self.sd.encode_images(item["garments"].to(self.device)).float()
            features = self.garments_net.extract(garments, slots=[int(s) for s in item["slots"]])
            context = torch.cat([self._text(item["caption"]), self._text("")])
            gen = torch.Generator().manual_seed(self.cfg.seed)
            noise = torch.randn(1, 4, person.shape[-2] // 8, person.shape[-1] // 8, generator=gen).to(self.device)
            abar = self.sd.alphas_cumprod.to(self.device)

            def eps(x: Tensor, t: Tensor) -> Tensor:
                pred = self.sd.unet(x, t, context=context).float()
                return predicted_noise(pred, x, abar[t.long()].float(), self.sd.prediction)

            with Dresser(self.sd.unet, features, self.projections, strength=0.7) as dresser:
                dresser.cond_rows = guidance_layout(1, None)[1]
                latents = ddim_sample(eps, noise, steps=self.cfg.sample_steps, guidance=guidance)
            image = self.sd.decode_latents(latents).float()
        grid = _side_by_side([*item["garments"], item["person"], image[0].cpu()], person.shape[-2])
        path = self.output / "samples" / f"step{self.step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        return path


def _side_by_side(images: list[Tensor], height: int):
    """(3, h, w) images in [-1, 1], scaled to one height and put in a row, as a PIL image."""
    from ..files.images import side_by_side, tensor_to_image

    def scaled(im: Tensor) -> Tensor:
        return F.interpolate(im[None].float(), size=(height, round(im.shape[-1] * height / im.shape[-2])))[0]

    return side_by_side([tensor_to_image(scaled(im)) for im in images])


class _EpochOrder(torch.utils.data.Sampler):
    """Dataset indices in a per-epoch seeded permutation, from sample position `start`, endlessly.

    With several processes, process `rank` takes positions rank, rank + world, ...
    """

    def __init__(self, n: int, seed: int, start: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.seed, self.start, self.rank, self.world = n, seed, start, rank, world

    def __iter__(self) -> Iterator[int]:
        position = self.start * self.world + self.rank
        order, epoch = None, -1
        while True:
            if position // self.n != epoch:
                epoch = position // self.n
                order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            yield order[position % self.n]
            position += self.world


def train_from_config(cfg: TrainConfig, say: Callable[[str], None] = print) -> int:
    """Open the dataset, build the trainer, train; returns the step reached."""
    from ..files.manifest import DressingDataset

    dataset = DressingDataset(
        cfg.manifest,
        size=tuple(cfg.size),
        garment_size=tuple(cfg.garment_size),
        slot_names=cfg.slots,
        max_garments=cfg.max_garments,
    )
    say(dataset.report.summary())
    trainer = AnyDressingTrainer(cfg, dataset=dataset, say=say, progress_bar=True)
    step = trainer.train()
    if dataset.report.skipped:
        say(dataset.report.summary())
    return step
