"""'Train garment LoRA': dataset import, caption editor, training with progress. Gradio wiring, and the
background job that runs the trainer while the UI polls it; the logic is in garment_lora/.

No `from __future__ import annotations` here: gradio finds the `gr.SelectData` parameter by its annotation.
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

from ..garment_lora import captions as cap
from ..garment_lora.dataset import BG_SEGMENT, ImportOptions, background_choices, dataset_images, folder_sources
from ..garment_lora.dataset import import_images as run_import
from ..garment_lora.trainer import PRESETS, Progress, TrainConfig, check_name, train_lora
from ..images import ImageInputError
from ..sd_checkpoint import StableDiffusion, load_sd_checkpoint
from ..segment.sam_models import SamModelError, find_sam_files
from ..segment.segmenter import GRABCUT, Segmenter
from .segment_tab import SEGMENTER


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
        except (ValueError, RuntimeError, OSError) as e:  # bad settings, model refusals, disk: said plainly
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
    paths = gr.State([])  # the gallery's image paths, in order
    with gr.Accordion("1. Dataset: import photos of the garment", open=True):
        with gr.Row():
            dataset_dir = gr.Textbox(str(output_dir / "lora_train" / "dataset"), label="Dataset folder",
                                     elem_id="anydressing_lora_dataset_dir")  # fmt: skip
            source_dir = gr.Textbox(str(output_dir / "lora_dataset"), label="Import from folder (the Segment tab's "
                                    "'Add to LoRA dataset' saves here)", elem_id="anydressing_lora_source")  # fmt: skip
        uploads = gr.File(label="...or upload photos", file_count="multiple", elem_id="anydressing_lora_uploads")
        with gr.Row():
            background = gr.Radio(background_choices(), value=BG_SEGMENT, label="Background (an existing alpha is "
                                  "always kept)")  # fmt: skip
            models = _sam_choices(sam_dirs)
            sam_model = gr.Dropdown(models, value=models[-1], label="Segmentation model")
        with gr.Row():
            size = gr.Radio([512, 768, 1024], value=512, label="Size (square side, or long side)")
            shape = gr.Radio(["square", "keep aspect (buckets)"], value="square", label="Shape")
            margin = gr.Slider(0, 0.3, 0.05, step=0.01, label="Margin around the garment")
        with gr.Row():
            trigger = gr.Textbox("zxq", label="Trigger word", elem_id="anydressing_lora_trigger")
            class_word = gr.Textbox("shirt", label="Class word", elem_id="anydressing_lora_class")
            tagger_dir = gr.Textbox("", label="WD14 tagger folder (model.onnx + selected_tags.csv; empty: no tags)")
            threshold = gr.Slider(0.1, 0.9, 0.35, step=0.05, label="Tag threshold")
        with gr.Row():
            import_folder = gr.Button("Import from folder", elem_id="anydressing_lora_import_folder")
            import_uploads = gr.Button("Import uploads", elem_id="anydressing_lora_import_uploads")
        import_note = gr.Markdown(elem_id="anydressing_lora_import_note")
        report = gr.Dataframe(headers=["file", "result"], interactive=False, wrap=True,
                              elem_id="anydressing_lora_report")  # fmt: skip

    with gr.Accordion("2. Captions", open=True), gr.Row():
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Dataset (click an image to edit its caption)", columns=6, height=360,
                                 allow_preview=False, elem_id="anydressing_lora_gallery")  # fmt: skip
            refresh = gr.Button("Reload the dataset folder")
        with gr.Column(scale=2):
            selected = gr.Textbox(label="Image", interactive=False, elem_id="anydressing_lora_selected")
            caption = gr.Textbox(label="Caption (comma-separated tags)", lines=3, elem_id="anydressing_lora_caption")
            save_caption = gr.Button("Save caption", variant="primary", elem_id="anydressing_lora_save_caption")
            with gr.Row():
                tag = gr.Textbox(label="Tag", elem_id="anydressing_lora_tag")
                new_tag = gr.Textbox(label="Replace with")
            with gr.Row():
                add_end = gr.Button("Add to all (end)")
                add_front = gr.Button("Add to all (front)")
                remove = gr.Button("Remove from all")
                replace = gr.Button("Replace in all")
            caption_note = gr.Markdown(elem_id="anydressing_lora_caption_note")
            counts = gr.Dataframe(headers=["tag", "images"], interactive=False, label="Tag counts",
                                  elem_id="anydressing_lora_counts")  # fmt: skip

    with gr.Accordion("3. Train", open=True):
        with gr.Row():
            name = gr.Textbox("my_garment", label="LoRA name", elem_id="anydressing_lora_name")
            overwrite = gr.Checkbox(False, label="Overwrite an existing LoRA of that name")
            out_dir = gr.Textbox(str(host.lora_dir()), label="Save to folder", visible=not host.uses_loaded_model)
        with gr.Row(visible=not host.uses_loaded_model):
            checkpoint = gr.Textbox("", label="SD1.x checkpoint (.safetensors)", elem_id="anydressing_lora_checkpoint")
            tokenizer = gr.Textbox("", label="CLIP tokenizer folder (vocab.json + merges.txt; empty: the Hugging Face "
                                   "cache or the clip package)", elem_id="anydressing_lora_tokenizer")  # fmt: skip
        if host.uses_loaded_model:
            gr.Markdown("Trains on the checkpoint loaded in the WebUI; it is moved off the GPU while training and "
                        "restored exactly afterwards. Generations wait until training ends.")  # fmt: skip
        cuda = torch.cuda.is_available()
        with gr.Row():
            preset = gr.Radio(list(PRESETS), value="12 GB", label="VRAM preset (sets batch, precision, checkpointing)")
            rank = gr.Slider(1, 128, 16, step=1, label="Rank (dim)")
            alpha = gr.Slider(1, 128, 8, step=1, label="Alpha")
            epochs = gr.Number(50, precision=0, label="Epochs", elem_id="anydressing_lora_epochs")
        with gr.Row():
            lr = gr.Number(1e-4, label="Learning rate")
            batch = gr.Slider(1, 8, PRESETS["12 GB"]["batch_size"], step=1, label="Batch size")
            resolution = gr.Radio([512, 768], value=512, label="Resolution")
            precision = gr.Radio(["fp16", "bf16", "fp32"] if cuda else ["bf16", "fp32"],
                                 value="fp16" if cuda else "fp32", label="Precision")  # fmt: skip
            checkpointing = gr.Checkbox(True, label="Gradient checkpointing (less VRAM, slower)")
        with gr.Row():
            train_text = gr.Checkbox(False, label="Text-encoder LoRA")
            min_snr = gr.Number(5.0, label="Min-SNR gamma (0 = off)")
            noise_offset = gr.Number(0.0, label="Noise offset")
            masked = gr.Checkbox(True, label="Masked loss (alpha = garment)")
            buckets = gr.Checkbox(False, label="Aspect buckets (for 'keep aspect' datasets)")
        with gr.Row():
            sample_every = gr.Number(10, precision=0, label="Sample every N epochs (0 = never)")
            sample_prompt = gr.Textbox("", label="Sample prompt (empty: the first caption)")
            resume = gr.Checkbox(True, label="Resume an interrupted run of this name (from its -state.pt)")
        with gr.Row():
            start = gr.Button("Start training", variant="primary", elem_id="anydressing_lora_start")
            interrupt = gr.Button("Interrupt", elem_id="anydressing_lora_interrupt")
            watch = gr.Button("Show progress of the running training")
        progress = gr.Markdown(elem_id="anydressing_lora_progress")
        with gr.Row():
            loss_plot = gr.LinePlot(x="step", y="loss", title="Loss", width=500, height=260,
                                    elem_id="anydressing_lora_loss")  # fmt: skip
            samples = gr.Gallery(label="Samples", columns=4, height=260, elem_id="anydressing_lora_samples")
        final = gr.Markdown(elem_id="anydressing_lora_final")

    # --- dataset --------------------------------------------------------------------------------------------

    def show_dataset(folder: str):
        images = dataset_images(Path(folder.strip()))
        texts = {p: cap.read_caption(p) for p in images}
        tags = cap.tag_counts(texts.values()).most_common()
        return (
            [str(p) for p in images],
            [(str(p), f"{p.name}: {texts[p]}") for p in images],
            [list(t) for t in tags] or [["", ""]],
        )

    dataset_views = [paths, gallery, counts]

    def do_import(sources, folder, bg, sam, side, form, pad, trig, cls, tags_dir, thr, progress=gr.Progress()):  # noqa: B008
        try:
            target = Path(folder.strip())
            if sources is None:
                raise ValueError("no photos uploaded")
            if not isinstance(sources, list):
                source = Path(sources.strip())
                if source.resolve() == target.resolve():
                    raise ValueError("the source folder is the dataset folder")
                sources = folder_sources(source)
            segmenter, note = _segmenter(sam, sam_dirs)
            make_caption, caption_note = cap.captioner(trig, cls, tags_dir, float(thr))
            options = ImportOptions(int(side), bg, float(pad), form == "square")
            rows = run_import(sources, target, options, segmenter, make_caption,
                              lambda i, n, what: progress((i, n), desc=what))  # fmt: skip
        except (ValueError, ImageInputError, OSError) as e:
            return (f"⚠ Nothing imported: {e}", [["", ""]], *show_dataset(folder))
        imported = sum(r.saved is not None for r in rows)
        text = f"Imported {imported} of {len(rows)} files into {target}; {caption_note}{note}"
        return (text, [[r.name, r.result] for r in rows], *show_dataset(folder))

    import_inputs = [dataset_dir, background, sam_model, size, shape, margin, trigger, class_word, tagger_dir,
                     threshold]  # fmt: skip
    import_outputs = [import_note, report, *dataset_views]
    import_folder.click(do_import, [source_dir, *import_inputs], import_outputs)

    def uploaded(files, *rest):
        named = None if not files else [(Path(getattr(f, "orig_name", "") or f.name).name, Path(f.name)) for f in files]
        return do_import(named, *rest)

    import_uploads.click(uploaded, [uploads, *import_inputs], import_outputs)
    refresh.click(show_dataset, [dataset_dir], dataset_views, queue=False)

    # --- captions -------------------------------------------------------------------------------------------

    def on_select(image_paths: list[str], evt: gr.SelectData):
        if not image_paths or evt.index >= len(image_paths):
            return "", ""
        path = Path(image_paths[evt.index])
        return str(path), cap.read_caption(path)

    gallery.select(on_select, [paths], [selected, caption], queue=False)

    def on_save(image: str, text: str, folder: str):
        if not image or not Path(image).is_file():
            return ("Select an image in the gallery first.", *show_dataset(folder))
        cap.write_caption(Path(image), text)
        return (f"Saved {cap.caption_path(Path(image)).name}", *show_dataset(folder))

    save_caption.click(on_save, [selected, caption, dataset_dir], [caption_note, *dataset_views], queue=False)

    def batch_edit(action: str):
        def handler(folder: str, what: str, replacement: str, image: str):
            edits = {
                "add_end": lambda t: cap.add_tag(t, what),
                "add_front": lambda t: cap.add_tag(t, what, front=True),
                "remove": lambda t: cap.remove_tag(t, what),
                "replace": lambda t: cap.replace_tag(t, what, replacement),
            }
            if not cap.split_tags(what):
                return ("Type a tag first.", gr.update(), *show_dataset(folder))
            changed = cap.edit_all(Path(folder.strip()), edits[action])
            current = cap.read_caption(Path(image)) if image else gr.update()
            return (f"{changed} caption(s) changed", current, *show_dataset(folder))

        return handler

    for button, action in ((add_end, "add_end"), (add_front, "add_front"), (remove, "remove"), (replace, "replace")):
        button.click(batch_edit(action), [dataset_dir, tag, new_tag, selected], [caption_note, caption, *dataset_views],
                     queue=False)  # fmt: skip

    # --- training -------------------------------------------------------------------------------------------

    def on_preset(which: str):
        values = PRESETS[which]
        wanted = values["mixed_precision"] if cuda else "fp32"
        return values["batch_size"], wanted, values["gradient_checkpointing"]

    preset.change(on_preset, [preset], [batch, precision, checkpointing], queue=False)
    shape.change(lambda form: form != "square", [shape], [buckets], queue=False)

    settings = {
        "dataset_dir": dataset_dir, "name": name, "overwrite": overwrite, "out_dir": out_dir,
        "checkpoint": checkpoint, "tokenizer": tokenizer, "rank": rank, "alpha": alpha, "epochs": epochs,
        "learning_rate": lr, "batch_size": batch, "resolution": resolution, "mixed_precision": precision,
        "gradient_checkpointing": checkpointing, "train_text_encoder": train_text, "min_snr_gamma": min_snr,
        "noise_offset": noise_offset, "masked_loss": masked, "buckets": buckets, "sample_every_epochs": sample_every,
        "sample_prompt": sample_prompt, "resume": resume, "trigger": trigger, "class_word": class_word,
    }  # fmt: skip
    views = [progress, loss_plot, samples, final]

    def poll() -> Iterator[list]:
        """Yield the job's view about once a second until it ends, then once more with the final message."""
        while True:
            v = JOB.view
            yield [v.progress_text(), _loss_frame(v.losses), list(v.samples), v.message]
            if not v.running:
                return
            time.sleep(1.0)

    def on_start(*values):
        chosen = dict(zip(settings, values, strict=True))
        if not JOB.start(lambda job: run_training(job, host, chosen)):
            yield [gr.update(), gr.update(), gr.update(), "A training run is already going: Interrupt it first."]
            return
        yield from poll()

    start.click(on_start, list(settings.values()), views)
    watch.click(poll, None, views)
    interrupt.click(lambda: (JOB.stop.set(), "Interrupting after this step...")[1] if JOB.running else "Nothing "
                    "is training.", None, [final], queue=False)  # fmt: skip
    dataset_dir.blur(show_dataset, [dataset_dir], dataset_views, queue=False)


def _loss_frame(losses: list[tuple[int, float]]):
    """The curve for gr.LinePlot; None (an empty plot) before the first step. NaN/inf points are left out:
    the plot's JSON cannot carry them (the final message says when the loss went bad)."""
    import pandas as pd

    finite = [(step, loss) for step, loss in losses if math.isfinite(loss)]
    return pd.DataFrame(finite, columns=["step", "loss"]) if finite else None


def _sam_choices(sam_dirs: Callable[[], list[Path]]) -> list[str]:
    """GrabCut, then the SAM files: the last one is the default, so a SAM model is used when there is one."""
    return [GRABCUT, *find_sam_files(sam_dirs())]


def _segmenter(choice: str, sam_dirs: Callable[[], list[Path]]) -> tuple[Segmenter, str]:
    """The shared segmenter with the chosen SAM model (one SAM per process, shared with the Segment tab),
    or a model-free one for GrabCut (leaving the Segment tab's model loaded); a note on a fallback."""
    if choice == GRABCUT:
        return Segmenter(), ""
    try:
        SEGMENTER.load(find_sam_files(sam_dirs()).get(choice))
    except (SamModelError, RuntimeError) as e:
        return Segmenter(), f" (SAM could not load: {e}; GrabCut was used)"
    return SEGMENTER, ""


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
    for key in ("rank", "epochs", "batch_size", "resolution", "sample_every_epochs"):
        s[key] = int(s[key] or 0)
    for key in ("alpha", "learning_rate", "min_snr_gamma", "noise_offset"):
        s[key] = float(s[key] or 0)
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
    if result.status == "done":
        call = f"<lora:{result.output.stem}:1> {trigger}, {class_word}"
        refresh = " (refresh the Lora tab to see it)" if host.uses_loaded_model else ""
        return f"✅ Saved **{result.output}**{refresh}. Prompt with `{call}`.{skipped}"
    if result.status == "interrupted":
        return f"⏸ {result.message[0].upper()}{result.message[1:]}: press Start again to resume.{skipped}"
    return f"⚠ {result.message}{skipped}"
