"""One training loop for both trainers (AnyDressing, garment LoRA), on Lightning Fabric.

The loop owns what every run needs: precision (autocast, fp16 loss scaling), gradient accumulation without
needless gradient syncs, clipping, linear warm-up (LambdaLR), the NaN/inf guard, the step loop with a stop
event and a progress callback (a tqdm bar on the console), the resume state (state.py) with its settings
fingerprint, and several processes: DDP through Fabric, launched by torchrun or by Fabric itself
(`devices` > 1). A trainer subclasses `Trainer` and adds what differs: a module whose forward is the loss of
one micro-batch, the order of its micro-batches, its fingerprint and what it writes after a step.

Processes: each draws its own noise and data (generator seed + rank * SEED_STRIDE), DDP averages the
gradients; a parameter no process used keeps no gradient (AdamW skips it, as in one process). A
micro-batch whose loss reaches no trainable weight (AnyDressing's dropped garments) still joins the
gradient sync through a zero-weighted term on one weight.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import state as state_files
from .state import TrainingError

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
RESUME_HELP = "'latest' (this run's saved state, when there is one), 'no' (start afresh) or a state folder"
SEED_STRIDE = 1_000_003  # process r draws from seed + r * SEED_STRIDE


@dataclass
class LoopSettings:
    """What the loop needs from a trainer's config."""

    steps: int  # optimizer steps in all
    accumulation: int = 1  # micro-batches per optimizer step (a trainer's step may close earlier: MicroBatch)
    precision: str = "auto"  # PRECISIONS; auto: bf16 on CUDA where supported, else fp16; fp32 on the CPU
    max_grad_norm: float = 0.0  # 0: no clipping
    warmup_steps: int = 0  # linear LR warm-up over this many steps
    seed: int = 0
    device: str = ""  # "cpu", "cuda", "cuda:1"; empty: CUDA when available
    devices: int = 1  # processes on this machine; a launcher's LOCAL_WORLD_SIZE / WORLD_SIZE wins
    log_dir: str = ""  # a TensorBoard event log of the losses and learning rate here; empty: none


@dataclass
class MicroBatch:
    data: Any  # what the trainer's module takes
    closes_step: bool = True  # the last micro-batch of an optimizer step
    epoch: int = 0  # 1-based epoch it belongs to; 0 where a trainer has no epochs
    ends_epoch: bool = False


@dataclass
class StepRecord:
    """One optimizer step: the mean loss over its micro-batches and the sums of the trainer's logged terms."""

    step: int
    epoch: int
    ends_epoch: bool
    loss: float
    terms: dict[str, float]
    micro_batches: int
    seconds: float


@dataclass
class Progress:
    """What a progress bar shows; `loss` is this step's, `losses` the curve so far."""

    step: int
    total: int
    epoch: int
    loss: float
    sec_per_step: float
    eta_s: float
    losses: list[float] = field(repr=False, default_factory=list)
    sample: Path | None = None


def resolve_precision(name: str, device: torch.device) -> str:
    """fp32, fp16 or bf16 for this device; TrainingError for a name outside PRECISIONS or fp16 without CUDA."""
    if name not in PRECISIONS:
        raise TrainingError(f"mixed_precision must be one of {', '.join(PRECISIONS)}, not '{name}'")
    if name == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if name == "fp16" and device.type != "cuda":
        raise TrainingError("fp16 mixed precision needs a CUDA GPU; use bf16 or fp32")
    return name


class Trainer(ABC):
    """The shared loop. Subclasses build their module and optimizer, then call `setup`, then `fit`."""

    def __init__(
        self,
        settings: LoopSettings,
        state_dir: Path,
        *,
        stop: threading.Event | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        progress_bar: bool = False,
    ) -> None:
        self.settings = settings
        self.state_dir = state_dir
        self.stop = stop or threading.Event()
        self.on_progress = on_progress
        self.progress_bar = progress_bar
        self.fabric, self.precision, self.scaler = _fabric(settings)
        self.fabric.launch()
        self.rank, self.world, self.device = self.fabric.global_rank, self.fabric.world_size, self.fabric.device
        self.generator = torch.Generator().manual_seed(settings.seed + SEED_STRIDE * self.rank)
        self.step = 0
        self.losses: list[float] = []
        self.last_checkpoint: Path | None = None  # the newest model file a trainer wrote
        self.resumed_with_fresh_scaler = False  # a state without fp16 loss scale resumed in fp16
        self.message = ""  # why `fit` stopped, for the user
        self.scope: ExitStack | None = None  # contexts a loss keeps open through its backward pass
        self.events = _event_log(settings.log_dir) if self.rank == 0 else None

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype, None in fp32."""
        return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[self.precision]

    def autocast(self):
        """The run's autocast, for work outside the module's forward (caching, sampling)."""
        return self.fabric.autocast() if self.amp_dtype is not None else nullcontext()

    # --- what a trainer provides ---------------------------------------------------------------------

    @abstractmethod
    def micro_batches(self) -> Iterator[MicroBatch]:
        """The micro-batches from optimizer step `self.step` on (a resumed run continues where it stopped)."""

    @abstractmethod
    def fingerprint(self) -> dict[str, object]:
        """The settings a resumed run must share with the saved one to continue it exactly (JSON values, under
        the config's own names: a refused resume names them), the loop's included (precision, accumulation...)."""

    def after_step(self, record: StepRecord) -> Path | None:
        """Logs, checkpoints and samples after an optimizer step; returns a sample image to show, if any."""
        return None

    # --- setup and the loop --------------------------------------------------------------------------

    def setup(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """`module(batch)` returns (loss, terms): its forward is what DDP wraps, so it must own the trainables."""
        warmup = self.settings.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
        )
        self.module, self.optimizer = module, optimizer
        # Fabric's optimizer wrapper keeps its own copy of the state attributes: state is read and loaded
        # on `optimizer` itself, the wrapper only steps it (through the precision plugin's scaler).
        self.wrapped, self.stepper = self.fabric.setup(module, optimizer, move_to_device=False)

    def fit(self) -> str:
        """Train up to `settings.steps`: "done", "interrupted" (the stop event) or "nan" (`message` says why)."""
        total = self.settings.steps
        bar = self._bar()
        started, timed = time.perf_counter(), 0
        loss_sum, terms, micro, step_start = 0.0, {}, 0, time.perf_counter()
        try:
            for batch in self.micro_batches() if self.step < total else ():
                loss, batch_terms = self._micro_step(batch)
                if loss is None:
                    return "nan"
                loss_sum, micro = loss_sum + loss, micro + 1
                for key, value in batch_terms.items():
                    terms[key] = terms.get(key, 0.0) + value
                if not batch.closes_step:
                    continue
                self._optimizer_step()
                seconds = time.perf_counter() - step_start
                record = StepRecord(self.step, batch.epoch, batch.ends_epoch, loss_sum / micro, terms, micro, seconds)
                self.losses.append(record.loss)
                sample = self.after_step(record)
                timed += 1
                self._report(record, (time.perf_counter() - started) / timed, sample, bar)
                loss_sum, terms, micro, step_start = 0.0, {}, 0, time.perf_counter()
                if self.step >= total:
                    break
                if self.stop.is_set():
                    return "interrupted"
        finally:
            if bar is not None:
                bar.close()
            if self.events is not None:
                self.events.flush()
        return "done"

    def _micro_step(self, batch: MicroBatch) -> tuple[float | None, dict[str, float]]:
        """Forward and backward of one micro-batch; (None, terms) when its loss is not finite (nothing updated)."""
        sync = batch.closes_step or self.world == 1
        with self.fabric.no_backward_sync(self.wrapped, enabled=not sync), self.loss_scope():
            loss, terms = self.wrapped(batch.data)
            if not torch.isfinite(loss):
                self.optimizer.zero_grad(set_to_none=True)
                self.message = self._nan_message(terms)
                return None, terms
            if not loss.requires_grad and self.world > 1:
                loss = loss + 0.0 * next(p for p in self.module.parameters() if p.requires_grad).view(-1)[0]
            if loss.requires_grad:
                self.fabric.backward(loss / self.settings.accumulation)
        return float(loss.detach()), terms

    @contextmanager
    def loss_scope(self) -> Iterator[None]:
        """Where a loss and its backward pass run: what the loss enters into `self.scope` (AnyDressing's
        Dresser) stays open until the scope ends."""
        with ExitStack() as scope:
            self.scope = scope
            try:
                yield
            finally:
                self.scope = None

    def _optimizer_step(self) -> None:
        if self.settings.max_grad_norm:  # on the true gradients: unscaled first under fp16 (a no-op otherwise)
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.settings.max_grad_norm)
        self.stepper.step()  # with fp16: the scaler's step, skipped on inf gradients
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1

    def _nan_message(self, terms: dict[str, float]) -> str:
        detail = ", ".join(f"{k} {v:.4g}" for k, v in terms.items())
        kept = (
            f"the last good model file is {self.last_checkpoint.name}" if self.last_checkpoint else "no model file yet"
        )
        return (
            f"the loss is not finite (NaN/inf) at step {self.step + 1}{f' ({detail})' if detail else ''}; training "
            f"stopped before updating the weights ({kept}). Try a lower learning rate, bf16 or fp32 instead of fp16, "
            "or check the images; then resume from the last state."
        )

    def _bar(self):
        if not self.progress_bar or self.rank != 0:
            return None
        from tqdm import tqdm

        return tqdm(total=self.settings.steps, initial=self.step, unit="step", dynamic_ncols=True)

    def _report(self, record: StepRecord, per_step: float, sample: Path | None, bar) -> None:
        if self.events is not None:
            self.events.add_scalar("loss", record.loss, record.step)
            for key, value in record.terms.items():
                self.events.add_scalar(f"terms/{key}", value / record.micro_batches, record.step)
            self.events.add_scalar("lr", self.optimizer.param_groups[0]["lr"], record.step)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record.loss:.4g}")
        if self.on_progress is not None and self.rank == 0:
            eta = per_step * (self.settings.steps - self.step)
            self.on_progress(
                Progress(self.step, self.settings.steps, record.epoch, record.loss, per_step, eta, self.losses, sample)
            )

    # --- state ----------------------------------------------------------------------------------------

    def _fingerprint(self) -> dict[str, object]:
        return {"world": self.world, **self.fingerprint()}

    def save_state(self, folder: Path | None = None) -> None:
        """The resume state (state.py's format), every process's generator gathered into it, written by process 0
        and replaced only once complete."""
        import json

        folder = folder or self.state_dir
        generators = self.fabric.all_gather(self.generator.get_state())  # the one collective: (world, n) or (n,)
        if self.rank != 0:
            return
        tmp = state_files.staging_folder(folder)
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "fingerprint": json.dumps(self._fingerprint(), sort_keys=True),
            "losses": torch.tensor(self.losses, dtype=torch.float64),
            "last_checkpoint": str(self.last_checkpoint or ""),
        }
        state_files.write_main(tmp, self.module.state_dict(), state)
        for rank in range(self.world):
            own = generators[rank] if self.world > 1 else generators
            torch.save(own.cpu().clone(), tmp / state_files.generator_file(rank))
        state_files.publish(tmp, folder)

    def resume(self, where: str) -> bool:
        """Continue a saved run (`where`: RESUME_HELP); False when there is nothing to resume."""
        if where == "no":
            return False
        folder = self.state_dir if where == "latest" else Path(where)
        if not folder.is_dir():
            if where == "latest":
                return False
            raise TrainingError(f"resume: '{folder}' is not a state folder")
        weights, state, generator = state_files.read(folder, self.rank)
        changed = state_files.changed_settings(state.get("fingerprint"), self._fingerprint())
        if changed:
            raise TrainingError(
                f"'{folder.name}' was saved with other settings or another dataset ({changed}); resume with the "
                "same ones, or start afresh (resume 'no' / allow overwriting)"
            )
        try:
            self.module.load_state_dict(weights, strict=True)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            fresh_scaler = self.scaler.is_enabled() and not state["scaler"]
            if not fresh_scaler:
                self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise TrainingError(f"resume: '{folder}' cannot be loaded: {e}") from e
        self.generator.set_state(generator)
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step = int(state["step"])
        self.losses = state["losses"].tolist()
        if state["last_checkpoint"]:
            self.last_checkpoint = Path(state["last_checkpoint"])
        self.resumed_with_fresh_scaler = fresh_scaler
        return True


def _event_log(folder: str):
    """torch's TensorBoard writer when a log is asked for; TrainingError when the package is missing (before
    anything starts), since a run the user expects to follow there should not go unrecorded."""
    if not folder:
        return None
    if importlib.util.find_spec("tensorboard") is None:
        raise TrainingError("a TensorBoard log was asked for but the tensorboard package is not installed: "
                            "pip install tensorboard, or turn the log off")  # fmt: skip
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(folder)


def _fabric(settings: LoopSettings) -> tuple[Any, str, torch.cuda.amp.GradScaler]:
    """(Fabric, precision, loss scaler) for this run: DDP (gloo on the CPU, NCCL on GPUs) when several processes
    train, else one device. The scaler is ours (enabled for fp16 only), so its state goes into the resume state."""
    try:
        from lightning_fabric import Fabric
        from lightning_fabric.plugins import MixedPrecision
        from lightning_fabric.strategies import DDPStrategy
    except ImportError as e:  # A1111 pins pytorch_lightning, which brings it; a bare environment may lack it
        raise TrainingError("training needs lightning_fabric: pip install 'pytorch_lightning>=1.9'") from e
    device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE") or settings.devices)
    nodes = max(1, int(os.environ.get("WORLD_SIZE", local)) // local)
    precision = resolve_precision(settings.precision, device)
    scaler = torch.cuda.amp.GradScaler(enabled=precision == "fp16")
    plugins = []
    if precision != "fp32":
        plugins.append(
            MixedPrecision(
                "16" if precision == "fp16" else "bf16", device.type, scaler if scaler.is_enabled() else None
            )
        )
    if local * nodes > 1:
        strategy: Any = DDPStrategy(find_unused_parameters=True)  # GFE slots a sample does not use
        devices: Any = local
    else:
        strategy, devices = None, [device.index or 0] if device.type == "cuda" else 1
    fabric = Fabric(accelerator=device.type, devices=devices, num_nodes=nodes, strategy=strategy, plugins=plugins)
    return fabric, precision, scaler
