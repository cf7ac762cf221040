"""'Train garment LoRA': dataset import, caption editor, training with progress; the logic is in garment_lora/.

Here: the background job that runs the trainer while the UI polls it, the hosts it trains on, the Train
section's handlers (TrainingControls), and the one place that wires all handlers to the components
(`_wire`). The components are in lora_tab_layout.py, the dataset and caption handlers in lora_tab_dataset.py.
"""

import math
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import gradio as gr
import torch

from ..garment_lora.trainer import PRESETS, TrainConfig, check_name, train_lora
from ..sd.checkpoint import StableDiffusion, load_sd_checkpoint
from ..segment.segmenter import engine_choices
from ..training.loop import Progress
from ..training.state import TrainingError
from .lora_tab_dataset import (
    DatasetImport,
    ImportSettings,
    add_to_end,
    add_to_front,
    remove_from_all,
    replace_in_all,
    save_caption,
    select_image,
    show_dataset,
)
from .lora_tab_layout import LoraLayout, lora_layout


class TrainingHost(Protocol):
    """Where the model comes from and where the LoRA goes: the WebUI's loaded checkpoint and models/Lora,
    or (standalone) a checkpoint file and a folder."""

    uses_loaded_model: bool

    def lora_dir(self) -> Path: ...

    def model(self, checkpoint: str, tokenizer: str = "") -> AbstractContextManager[StableDiffusion]: ...

    def base_name(self, checkpoint: str) -> str: ...


@dataclass
class JobView:
    """What the UI shows of a training run; written by the training thread, read by the poller."""

    running: bool = False
    step: int = 0
    total: int = 0
    epoch: int = 0
    sec_per_step: float = 0.0
    losses: list[tuple[int, float]] = field(default_factory=list)
    samples: list[tuple[str, str]] = field(default_factory=list)  # (image file, caption)
    message: str = ""

    def progress_text(self) -> str:
        if self.total == 0:
            return "Preparing..." if self.running else ""
        eta = (self.total - self.step) * self.sec_per_step
        speed = f"{self.sec_per_step:.2f} s/it" if self.sec_per_step else "-- s/it"
        return (
            f"Step **{self.step} / {self.total}** ({100 * self.step / self.total:.0f} %), epoch {self.epoch}, "
            f"{speed}, ETA {_duration(eta)}"
        )


class TrainingJob:
    """One training run at a time in a background thread, so the UI stays responsive; the Interrupt
    button sets `stop`, which the trainer checks between steps."""

    def __init__(self) -> None:
        self.view = JobView()
        self.stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, work: Callable[["TrainingJob"], str]) -> bool:
        """Run `work(job)` (it returns the final message); False when a run is already going."""
        with self._lock:
            if self.running:
                return False
            self.view, self.stop = JobView(running=True), threading.Event()
            self._thread = threading.Thread(target=self._run, args=(work,), daemon=True, name="garment-lora")
            self._thread.start()
            return True

    def _run(self, work: Callable[["TrainingJob"], str]) -> None:
        try:
            self.view.message = work(self)
        except (TrainingError, ValueError, RuntimeError, OSError) as e:  # settings, model refusals, disk: said plainly
            self.view.message = f"⚠ Training stopped: {e}"
        except Exception as e:  # a bug: the UI says so, the console keeps the traceback
            traceback.print_exc()
            self.view.message = f"⚠ Training failed: {type(e).__name__}: {e}"
        finally:
            self.view.running = False

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)


JOB = TrainingJob()  # one per process: a second Start while it runs is refused


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def build(
    sam_dirs: Callable[[], list[Path]],
    output_dir: Path,
    host: TrainingHost,
) -> None:
    """Components of the tab, inside the caller's Blocks/Tab context."""
    cuda = torch.cuda.is_available()
    ui = lora_layout(output_dir, engine_choices(sam_dirs()), host.lora_dir(), host.uses_loaded_model, cuda)
    _wire(ui, DatasetImport(sam_dirs), TrainingControls(host, list(ui.training_inputs()), cuda))


def _wire(ui: LoraLayout, importer: DatasetImport, training: "TrainingControls") -> None:
    """Every event of the tab. The quick handlers skip the queue; imports and training, long and showing
    progress, use it."""
    d, c, s, run = ui.dataset, ui.captions, ui.settings, ui.run
    import_inputs = ImportSettings.inputs(d)
    import_outputs = [d.import_note, d.report, *ui.dataset_views]
    d.import_folder.click(importer.from_folder, [d.source_dir, *import_inputs], import_outputs)
    d.import_uploads.click(importer.from_uploads, [d.uploads, *import_inputs], import_outputs)
    c.refresh.click(show_dataset, [d.dataset_dir], ui.dataset_views, queue=False)
    c.gallery.select(select_image, [ui.paths], [c.selected, c.caption], queue=False)
    c.save.click(save_caption, [c.selected, c.caption, d.dataset_dir], [c.note, *ui.dataset_views], queue=False)
    for button, edit in (
        (c.add_end, add_to_end), (c.add_front, add_to_front), (c.remove, remove_from_all), (c.replace, replace_in_all)
    ):  # fmt: skip
        button.click(edit, [d.dataset_dir, c.tag, c.new_tag, c.selected], [c.note, c.caption, *ui.dataset_views],
                     queue=False)  # fmt: skip
    s.preset.change(training.preset, [s.preset], [s.batch, s.precision, s.checkpointing, s.resolution], queue=False)
    d.shape.change(_buckets_for, [d.shape], [s.buckets], queue=False)
    run.start.click(training.start, list(ui.training_inputs().values()), run.views)
    run.watch.click(training.poll, None, run.views)
    run.interrupt.click(training.interrupt, None, [run.final], queue=False)
    d.dataset_dir.blur(show_dataset, [d.dataset_dir], ui.dataset_views, queue=False)


def _buckets_for(shape: str) -> bool:
    """Aspect buckets on for a 'keep aspect' dataset, off for a square one."""
    return shape != "square"


class TrainingControls:
    """The Train section's handlers: start a run on JOB and follow it, follow the running one, interrupt it.
    `names`: run_training's setting names, in the order of the Start button's inputs."""

    def __init__(self, host: TrainingHost, names: list[str], cuda: bool) -> None:
        self.host = host
        self.names = names
        self.cuda = cuda

    def preset(self, which: str) -> tuple[int, str, bool, int]:
        """A VRAM preset's batch size, precision (fp32 without CUDA), gradient checkpointing and resolution."""
        values = PRESETS[which]
        wanted = values["mixed_precision"] if self.cuda else "fp32"
        return values["batch_size"], wanted, values["gradient_checkpointing"], values["resolution"]

    def start(self, *values: Any) -> Iterator[list]:
        """Start a run with the settings' values, then follow it; refused while one runs."""
        chosen = dict(zip(self.names, values, strict=True))
        if not JOB.start(lambda job: run_training(job, self.host, chosen)):
            yield [gr.update(), gr.update(), gr.update(), "A training run is already going: Interrupt it first."]
            return
        yield from self.poll()

    @staticmethod
    def poll() -> Iterator[list]:
        """Yield the job's view about once a second until it ends, then once more with the final message."""
        while True:
            v = JOB.view
            yield [v.progress_text(), _loss_frame(v.losses), list(v.samples), v.message]
            if not v.running:
                return
            time.sleep(1.0)

    @staticmethod
    def interrupt() -> str:
        """Ask the running job to stop after its current step (the trainer checks between steps)."""
        if not JOB.running:
            return "Nothing is training."
        JOB.stop.set()
        return "Interrupting after this step..."


def _loss_frame(losses: list[tuple[int, float]]):
    """The curve for gr.LinePlot; None (an empty plot) before the first step. NaN/inf points are left out:
    the plot's JSON cannot carry them (the final message says when the loss went bad)."""
    import pandas as pd

    finite = [(step, loss) for step, loss in losses if math.isfinite(loss)]
    return pd.DataFrame(finite, columns=["step", "loss"]) if finite else None


class CheckpointHost:
    """The tab's TrainingHost standalone: an SD1.x checkpoint file, LoRAs saved to a folder."""

    uses_loaded_model = False

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def lora_dir(self) -> Path:
        return self.folder

    @contextmanager
    def model(self, checkpoint: str, tokenizer: str = "") -> Iterator[StableDiffusion]:
        if not checkpoint.strip():
            raise ValueError("give the path of an SD1.x checkpoint to train on")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        folder = Path(tokenizer.strip()) if tokenizer.strip() else None
        yield load_sd_checkpoint(Path(checkpoint.strip()), tokenizer=folder, device=device)

    def base_name(self, checkpoint: str) -> str:
        return Path(checkpoint.strip()).stem


def run_training(job: TrainingJob, host: TrainingHost, settings: dict[str, Any]) -> str:
    """The tab's settings -> TrainConfig, the model from the host, the trainer's progress into the job's view;
    returns the final message."""
    s = dict(settings)
    trigger, class_word = s.pop("trigger"), s.pop("class_word")
    checkpoint, tokenizer, folder = s.pop("checkpoint"), s.pop("tokenizer"), s.pop("out_dir")
    out_dir = host.lora_dir() if host.uses_loaded_model else Path(folder.strip())
    s["reg_dir"] = Path(s["reg_dir"].strip()) if (s.get("reg_dir") or "").strip() else None
    for key in ("rank", "epochs", "batch_size", "resolution", "sample_every_epochs", "keep_tags", "reg_repeats"):
        s[key] = int(s[key] or 0)
    for key in ("alpha", "learning_rate", "min_snr_gamma", "noise_offset", "caption_dropout"):
        s[key] = float(s[key] or 0)
    s["resume"] = "latest" if s["resume"] else "no"
    config = TrainConfig(
        dataset_dir=Path(s.pop("dataset_dir").strip()),
        output_dir=out_dir,
        sdpa=not host.uses_loaded_model,  # the WebUI keeps its own attention optimisation
        base_model_name=host.base_name(checkpoint),
        **s,
    )
    check_name(config.name)  # before the model is loaded or lent

    def on_progress(p: Progress) -> None:
        v = job.view
        v.step, v.total, v.epoch, v.sec_per_step = p.step, p.total, p.epoch, p.sec_per_step
        v.losses = [(i + 1, loss) for i, loss in enumerate(p.losses)]
        if p.sample is not None:
            v.samples = [*v.samples, (str(p.sample), f"epoch {p.epoch}")]

    with host.model(checkpoint, tokenizer) as model:
        result = train_lora(model, config, on_progress=on_progress, stop=job.stop)
    skipped = f" Skipped: {'; '.join(result.skipped)}." if result.skipped else ""
    skipped += "".join(f" Note: {note}." for note in result.notes)
    if result.status == "done":
        call = f"<lora:{result.output.stem}:1> {trigger}, {class_word}"
        refresh = " (refresh the Lora tab to see it)" if host.uses_loaded_model else ""
        return f"✅ Saved **{result.output}**{refresh}. Prompt with `{call}`.{skipped}"
    if result.status == "interrupted":
        return f"⏸ {result.message[0].upper()}{result.message[1:]}: press Start again to resume.{skipped}"
    return f"⚠ {result.message}{skipped}"
