"""The AnyDressing trainer: GarmentsNet (+ per-slot GFE LoRAs) and the Dressing-Attention projections,
trained with L_LDM + (lambda1 / m) L_loc + lambda2 L_texture (docs/method.md LOSS; the terms are in losses.py).

GarmentsNet is a separate copy of the SD UNet with its cross-attention skipped; DressingNet is the SD
UNet itself, frozen, dressed by a Dresser in additive mode whose K'/V' are recomputed at every forward
(the projections train). The VAE, text encoder and DressingNet get no gradient and are never written.
Each sample is its own forward: one Dresser call shares one garment set across its rows, and samples
carry different garments, so a batch is gradient accumulation over samples.

Randomness (timesteps, noise, latent sampling, dropout, data order) comes from one generator whose
state is saved with the weights and the optimizer, so a resumed run takes the same steps as an
uninterrupted one (equal up to float rounding: README, What resume guarantees).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
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
from ..garment_lora.memory import training_patches
from ..sd_checkpoint import StableDiffusion, load_sd_checkpoint
from .config import TrainConfig
from .dists import DISTS, load_dists
from .losses import (
    LossSwitches,
    diffusion_target,
    ldm_loss,
    localization_loss,
    predicted_noise,
    texture_loss,
)

log = logging.getLogger(__name__)
LOG_COLUMNS = ("step", "loss", "ldm", "loc", "perc", "hf", "texture_samples", "seconds")
STATE_DIR = "state"
TEXT_CACHE = 1024  # caption embeddings kept: 77 x 768 floats each, ~240 MB in fp32 at most


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a bad resume state), with a message meant for the user."""


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


class AnyDressingTrainer:
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
    ) -> None:
        self.cfg = cfg
        self.say = say
        self.rank, self.world = _distributed_setup()
        self.device = _device(cfg.device, self.rank, self.world)
        self.amp_dtype = _amp_dtype(cfg.mixed_precision, self.device)
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
        self.trainable = nn.ModuleDict({"garments_net": self.garments_net.unet, "lora": lora, "da": self.projections})
        self.trainable.to(self.device).requires_grad_(True).train()
        frozen_dtype = self.amp_dtype or torch.float32  # frozen weights stored in the autocast dtype on CUDA
        for module in self.sd.modules().values():
            module.to(self.device, frozen_dtype).requires_grad_(False).eval()
        self.optimizer = torch.optim.AdamW(
            [p for p in self.trainable.parameters() if p.requires_grad],
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            foreach=True,  # one kernel per group, not per tensor (torch picks per-tensor on CPU by default)
        )
        self.scaler = torch.cuda.amp.GradScaler(enabled=self.amp_dtype == torch.float16)
        self.losses = LossSwitches(
            cfg.loss_ldm, cfg.loss_loc, cfg.loss_perc, cfg.loss_hf, cfg.lambda_loc, cfg.lambda_texture, cfg.eta
        )
        self.dists = self._dists(dists)
        if self.dists is not None:
            self.dists.to(self.device)
        self.dataset = dataset
        self.generator = torch.Generator().manual_seed(cfg.seed + 1_000_003 * self.rank)  # own draws per process
        self.step = 0
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

    def sample_losses(self, item: dict[str, Any], *, backward_scale: float | None = None) -> StepLosses:
        """Losses of one dataset item; with `backward_scale`, also backpropagates total * scale.

        Call inside `patched()`. The backward runs inside the Dresser, which the recomputation of
        checkpointed blocks needs.
        """
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
        with torch.no_grad(), self._autocast():
            context = self._text("" if drop_text else item["caption"])
        zero = torch.zeros((), device=dev)
        with self._autocast(), contextlib.ExitStack() as stack:
            dresser = None
            if not drop_garments:
                features = self._features(garment_latents, item["slots"])
                dresser = Dresser(
                    self.sd.unet,
                    features,
                    self.projections,
                    strength=self.cfg.da_strength,
                    record_attention_mass=self.losses.loc,
                    recompute_kv=True,
                )
                stack.enter_context(dresser)
            pred = self.sd.unet(z_t, t_dev.float(), context=context).float()
            l_ldm = ldm_loss(pred, diffusion_target(z0, noise, abar, self.sd.prediction)) if self.losses.ldm else zero
            l_loc = perc = hf = zero
            if dresser is not None and self.losses.loc:
                l_loc = localization_loss(dresser.attention_mass, masks, tuple(z0.shape[-2:]))
            texture = dresser is not None and int(t) <= self.losses.eta and (self.dists is not None or self.losses.hf)
            if dresser is not None:
                eps = predicted_noise(pred, z_t, abar, self.sd.prediction)
                perc, hf = texture_loss(
                    self.sd.decode_latents,
                    z_t,
                    eps,
                    abar,
                    t_dev,
                    person,
                    masks,
                    item["edges"][None].to(dev),
                    eta=self.losses.eta,
                    dists=self.dists,
                    hf=self.losses.hf,
                )
            total = l_ldm + self.losses.lambda_loc / self.n_da_layers * l_loc + self.losses.lambda_texture * (perc + hf)
            result = StepLosses(total, l_ldm, l_loc, perc, hf, texture)
            if not torch.isfinite(total):
                terms = ", ".join(f"{k} {v:.4g}" for k, v in result.values().items())
                raise TrainingError(
                    f"step {self.step + 1}: the loss is not finite ({terms}); stopped before updating the weights. "
                    "Lower lr, or use mixed_precision = 'bf16' or 'no' instead of fp16; resume from the last state."
                )
            if backward_scale is not None and total.requires_grad:
                self.scaler.scale(total * backward_scale).backward()
        return result

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

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
        with torch.no_grad(), self._autocast():
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
        target = self.cfg.steps if steps is None else steps
        if self.cfg.resume:
            self.resume(self.cfg.resume)
        items = self.items()
        with self.patched():
            while self.step < target:
                row = self.train_step(items)
                self._log(row)
                if self.step % self.cfg.save_every == 0 or self.step == target:
                    self.save()
                if self.cfg.sample_every and self.step % self.cfg.sample_every == 0:
                    self.sample_grid()
        return self.step

    def train_step(self, items: Iterator[dict[str, Any]]) -> dict[str, Any]:
        """One optimizer step over `gradient_accumulation` samples (call inside `patched()`); the log row."""
        start = time.perf_counter()
        accumulation = self.cfg.gradient_accumulation
        sums = dict.fromkeys(("total", "ldm", "loc", "perc", "hf"), 0.0)
        texture_samples = 0
        for _ in range(accumulation):
            result = self.sample_losses(next(items), backward_scale=1.0 / accumulation)
            for key, value in result.values().items():
                sums[key] += value / accumulation
            texture_samples += int(result.texture)
        self._optimizer_step()
        self.step += 1
        row = {"step": self.step, "loss": sums["total"], **{k: sums[k] for k in ("ldm", "loc", "perc", "hf")}}
        row.update(texture_samples=texture_samples, seconds=time.perf_counter() - start)
        return row

    def _optimizer_step(self) -> None:
        if self.world > 1:
            self._average_gradients()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def _average_gradients(self) -> None:
        """Mean of every process's gradients; a tensor no process gave a gradient keeps none (AdamW skips it)."""
        params = list(self.trainable.parameters())
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=self.device)
        dist.all_reduce(present)
        for p, count in zip(params, present.tolist(), strict=True):
            if count == 0:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= self.world

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
        """The model file (models/anydressing_stepXXXXXXX.safetensors, process 0) and the resume state
        (state/, every process's generator in it), each replaced only once complete. Returns the model file."""
        path = None
        if self.rank == 0:
            models = self.output / "models"
            models.mkdir(parents=True, exist_ok=True)
            path = models / f"anydressing_step{self.step:07d}.safetensors"
            tmp = path.with_suffix(".tmp")
            save_checkpoint(self.anydressing_model(), tmp)
            tmp.replace(path)
            if self.cfg.keep_checkpoints:
                for old in sorted(models.glob("anydressing_step*.safetensors"))[: -self.cfg.keep_checkpoints]:
                    old.unlink()
        self._save_state(self.output / STATE_DIR)
        return path

    def _save_state(self, folder: Path) -> None:
        tmp = folder.with_name(folder.name + ".tmp")
        if self.rank == 0:
            _empty_dir(tmp)  # a save interrupted earlier may have left files there
            weights = {k: v.detach().contiguous().cpu() for k, v in self.trainable.state_dict().items()}
            save_file(weights, str(tmp / "weights.safetensors"))
            state = {
                "step": self.step,
                "world": self.world,
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            }
            torch.save(state, tmp / "state.pt")
        self._barrier()
        torch.save(self.generator.get_state(), tmp / f"generator_rank{self.rank}.pt")
        self._barrier()
        if self.rank == 0:
            if folder.exists():
                _empty_dir(folder)
                folder.rmdir()
            tmp.rename(folder)
        self._barrier()

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def resume(self, where: str) -> None:
        folder = self.output / STATE_DIR if where == "latest" else Path(where)
        if not folder.is_dir():
            if where == "latest":
                return  # nothing saved yet: a fresh start
            raise TrainingError(f"resume: '{folder}' is not a state folder")
        try:
            weights = load_file(str(folder / "weights.safetensors"))
            state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
            if int(state["world"]) != self.world:
                raise ValueError(f"it was saved by {state['world']} processes, this run has {self.world}")
            generator = torch.load(folder / f"generator_rank{self.rank}.pt", weights_only=True)
            self.trainable.load_state_dict(weights, strict=True)
            self.optimizer.load_state_dict(state["optimizer"])
            fresh_scaler = self.scaler.is_enabled() and not state["scaler"]
            if not fresh_scaler:
                self.scaler.load_state_dict(state["scaler"])
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:
            raise TrainingError(f"resume: '{folder}' cannot be loaded: {e}") from e
        if fresh_scaler:  # saved with bf16 or fp32, which keep no loss scale: fp16 finds its own in a few steps
            self.say("resume: the state has no fp16 loss scale (saved without fp16); starting it afresh")
        self.generator.set_state(generator)
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step = int(state["step"])
        self._truncate_log()
        self.say(f"resumed from '{folder}' at step {self.step}")

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
        from ..sampling import ddim_sample, guidance_layout

        if self.rank != 0:
            return None
        item = self.dataset[index]
        person = item["person"][None].to(self.device)
        with self._autocast():
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
    from ..images import side_by_side, tensor_to_image

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


def _empty_dir(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        f.unlink()


def _distributed_setup() -> tuple[int, int]:
    """(rank, world size): torchrun's environment when WORLD_SIZE > 1 (gradients are all-reduced by hand)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def _device(name: str, rank: int, world: int) -> torch.device:
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) if world > 1 else 0)
    return torch.device("cpu")


def _amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, None for fp32 (always on CPU)."""
    if device.type != "cuda" or mode == "no":
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def train_from_config(cfg: TrainConfig, say: Callable[[str], None] = print) -> int:
    """Open the dataset, build the trainer, train; returns the step reached."""
    from .dataset import DressingDataset

    dataset = DressingDataset(
        cfg.manifest,
        size=tuple(cfg.size),
        garment_size=tuple(cfg.garment_size),
        slot_names=cfg.slots,
        max_garments=cfg.max_garments,
    )
    say(dataset.report.summary())
    trainer = AnyDressingTrainer(cfg, dataset=dataset, say=say)
    step = trainer.train()
    if dataset.report.skipped:
        say(dataset.report.summary())
    return step
