"""The 'Train garment LoRA' tab's components, one function per section, each returning its components by
name, so the wiring in lora_tab.py reads `ui.captions.save.click(...)` rather than indexing lists.
No handlers here.

The `elem_id`s are javascript/anydressing.js's and the browser tests' hooks: keep them as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from ..garment_lora.dataset import BG_SEGMENT, background_choices
from ..garment_lora.kohya_lora import NETWORKS
from ..garment_lora.trainer import PRESETS
from .gradio_compat import plot_size


@dataclass(frozen=True)
class DatasetPanel:
    """Section 1: where the photos come from, and how they become training images and captions."""

    dataset_dir: gr.Textbox
    source_dir: gr.Textbox
    uploads: gr.File
    background: gr.Radio
    sam_model: gr.Dropdown
    size: gr.Radio
    shape: gr.Radio
    margin: gr.Slider
    trigger: gr.Textbox
    class_word: gr.Textbox
    tagger_dir: gr.Textbox
    threshold: gr.Slider
    import_folder: gr.Button
    import_uploads: gr.Button
    import_note: gr.Markdown
    report: gr.Dataframe


@dataclass(frozen=True)
class CaptionPanel:
    """Section 2: the dataset's images, one caption's editor, and edits of every caption at once."""

    gallery: gr.Gallery
    refresh: gr.Button
    selected: gr.Textbox
    caption: gr.Textbox
    save: gr.Button
    tag: gr.Textbox
    new_tag: gr.Textbox
    add_end: gr.Button
    add_front: gr.Button
    remove: gr.Button
    replace: gr.Button
    note: gr.Markdown
    counts: gr.Dataframe


@dataclass(frozen=True)
class TrainTarget:
    """Section 3, first rows: the LoRA's name and folder, and (standalone) the model it is trained on."""

    name: gr.Textbox
    overwrite: gr.Checkbox
    out_dir: gr.Textbox
    checkpoint: gr.Textbox
    tokenizer: gr.Textbox


@dataclass(frozen=True)
class TrainSettings:
    """Section 3: the training's settings; the preset sets batch, precision and checkpointing."""

    preset: gr.Radio
    rank: gr.Slider
    alpha: gr.Slider
    network: gr.Radio
    epochs: gr.Number
    lr: gr.Number
    batch: gr.Slider
    resolution: gr.Radio
    precision: gr.Radio
    checkpointing: gr.Checkbox
    train_text: gr.Checkbox
    min_snr: gr.Number
    noise_offset: gr.Number
    masked: gr.Checkbox
    buckets: gr.Checkbox
    caption_dropout: gr.Slider
    shuffle_tags: gr.Checkbox
    keep_tags: gr.Number
    reg_dir: gr.Textbox
    reg_repeats: gr.Number
    tensorboard: gr.Checkbox
    sample_every: gr.Number
    sample_prompt: gr.Textbox
    resume: gr.Checkbox


@dataclass(frozen=True)
class TrainRun:
    """Section 3, last rows: the run's controls and what it shows while it runs."""

    start: gr.Button
    interrupt: gr.Button
    watch: gr.Button
    progress: gr.Markdown
    loss_plot: gr.LinePlot
    samples: gr.Gallery
    final: gr.Markdown

    @property
    def views(self) -> list[gr.components.Component]:
        """What following a run updates, in the order of lora_tab.TrainingControls.poll's values."""
        return [self.progress, self.loss_plot, self.samples, self.final]


@dataclass(frozen=True)
class LoraLayout:
    """All of the tab's components; `paths` holds the gallery's image paths, in order."""

    paths: gr.State
    dataset: DatasetPanel
    captions: CaptionPanel
    target: TrainTarget
    settings: TrainSettings
    run: TrainRun

    @property
    def dataset_views(self) -> list[gr.components.Component]:
        """What showing the dataset folder updates, in the order of lora_tab_dataset.show_dataset's values."""
        return [self.paths, self.captions.gallery, self.captions.counts]

    def training_inputs(self) -> dict[str, gr.components.Component]:
        """The components whose values make up a training run's settings, by lora_tab.run_training's names."""
        d, t, s = self.dataset, self.target, self.settings
        return {
            "dataset_dir": d.dataset_dir, "name": t.name, "overwrite": t.overwrite, "out_dir": t.out_dir,
            "checkpoint": t.checkpoint, "tokenizer": t.tokenizer, "rank": s.rank, "alpha": s.alpha,
            "network": s.network, "epochs": s.epochs, "learning_rate": s.lr, "batch_size": s.batch,
            "resolution": s.resolution,
            "mixed_precision": s.precision, "gradient_checkpointing": s.checkpointing,
            "train_text_encoder": s.train_text, "min_snr_gamma": s.min_snr, "noise_offset": s.noise_offset,
            "masked_loss": s.masked, "buckets": s.buckets, "caption_dropout": s.caption_dropout,
            "shuffle_tags": s.shuffle_tags, "keep_tags": s.keep_tags, "reg_dir": s.reg_dir,
            "reg_repeats": s.reg_repeats, "tensorboard": s.tensorboard, "sample_every_epochs": s.sample_every,
            "sample_prompt": s.sample_prompt, "resume": s.resume, "trigger": d.trigger, "class_word": d.class_word,
        }  # fmt: skip


def lora_layout(output_dir: Path, models: list[str], lora_dir: Path, loaded_model: bool, cuda: bool) -> LoraLayout:
    """The tab's components in page order, inside the caller's Blocks/Tab context. `models`: the segmentation
    choices (the last is the default); `loaded_model`: training uses the WebUI's model, so no checkpoint
    or folder fields; `cuda`: offer fp16."""
    paths = gr.State([])
    dataset = _dataset_panel(output_dir, models)
    captions = _caption_panel()
    with gr.Accordion("3. Train", open=True):
        target = _train_target(lora_dir, loaded_model)
        settings = _train_settings(cuda)
        run = _train_run()
    return LoraLayout(paths, dataset, captions, target, settings, run)


def _dataset_panel(output_dir: Path, models: list[str]) -> DatasetPanel:
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
    return DatasetPanel(
        dataset_dir,
        source_dir,
        uploads,
        background,
        sam_model,
        size,
        shape,
        margin,
        trigger,
        class_word,
        tagger_dir,
        threshold,
        import_folder,
        import_uploads,
        import_note,
        report,
    )


def _caption_panel() -> CaptionPanel:
    with gr.Accordion("2. Captions", open=True), gr.Row():
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Dataset (click an image to edit its caption)", columns=6, height=360,
                                 allow_preview=False, elem_id="anydressing_lora_gallery")  # fmt: skip
            refresh = gr.Button("Reload the dataset folder")
        with gr.Column(scale=2):
            selected = gr.Textbox(label="Image", interactive=False, elem_id="anydressing_lora_selected")
            caption = gr.Textbox(label="Caption (comma-separated tags)", lines=3, elem_id="anydressing_lora_caption")
            save = gr.Button("Save caption", variant="primary", elem_id="anydressing_lora_save_caption")
            with gr.Row():
                tag = gr.Textbox(label="Tag", elem_id="anydressing_lora_tag")
                new_tag = gr.Textbox(label="Replace with")
            with gr.Row():
                add_end = gr.Button("Add to all (end)")
                add_front = gr.Button("Add to all (front)")
                remove = gr.Button("Remove from all")
                replace = gr.Button("Replace in all")
            note = gr.Markdown(elem_id="anydressing_lora_caption_note")
            counts = gr.Dataframe(headers=["tag", "images"], interactive=False, label="Tag counts",
                                  elem_id="anydressing_lora_counts")  # fmt: skip
    return CaptionPanel(
        gallery, refresh, selected, caption, save, tag, new_tag, add_end, add_front, remove, replace, note, counts
    )


def _train_target(lora_dir: Path, loaded_model: bool) -> TrainTarget:
    with gr.Row():
        name = gr.Textbox("my_garment", label="LoRA name", elem_id="anydressing_lora_name")
        overwrite = gr.Checkbox(False, label="Overwrite an existing LoRA of that name")
        out_dir = gr.Textbox(str(lora_dir), label="Save to folder", visible=not loaded_model)
    with gr.Row(visible=not loaded_model):
        checkpoint = gr.Textbox("", label="SD1.x checkpoint (.safetensors)", elem_id="anydressing_lora_checkpoint")
        tokenizer = gr.Textbox("", label="CLIP tokenizer folder (vocab.json + merges.txt; empty: the Hugging Face "
                               "cache or the clip package)", elem_id="anydressing_lora_tokenizer")  # fmt: skip
    if loaded_model:
        gr.Markdown("Trains on the checkpoint loaded in the WebUI; it is moved off the GPU while training and "
                    "restored exactly afterwards. Generations wait until training ends.")  # fmt: skip
    return TrainTarget(name, overwrite, out_dir, checkpoint, tokenizer)


def _train_settings(cuda: bool) -> TrainSettings:
    with gr.Row():
        says = "VRAM preset (sets batch, precision, checkpointing, resolution)"
        preset = gr.Radio(list(PRESETS), value="12 GB", label=says)
        rank = gr.Slider(1, 128, 16, step=1, label="Rank (dim)")
        alpha = gr.Slider(1, 128, 8, step=1, label="Alpha")
        network = gr.Radio(list(NETWORKS), value="lora", label="Network (locon, loha, lokr: lycoris-lora package)",
                           elem_id="anydressing_lora_network")  # fmt: skip
        epochs = gr.Number(50, precision=0, label="Epochs", elem_id="anydressing_lora_epochs")
    with gr.Row():
        lr = gr.Number(1e-4, label="Learning rate")
        batch = gr.Slider(1, 8, PRESETS["12 GB"]["batch_size"], step=1, label="Batch size")
        resolution = gr.Radio([512, 768, 1024], value=512, label="Resolution (SDXL: 1024)")
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
        caption_dropout = gr.Slider(0.0, 0.5, 0.0, step=0.05, label="Caption dropout (share of steps without text)",
                                    elem_id="anydressing_lora_caption_dropout")  # fmt: skip
        shuffle_tags = gr.Checkbox(False, label="Shuffle tags each step", elem_id="anydressing_lora_shuffle")
        keep_tags = gr.Number(1, precision=0, label="Keep the first N tags in place (trigger, class word)",
                              elem_id="anydressing_lora_keep_tags")  # fmt: skip
    with gr.Row():
        reg_dir = gr.Textbox("", label="Regularisation images folder (optional: other garments of the class, "
                             "with captions)", elem_id="anydressing_lora_reg_dir")  # fmt: skip
        reg_repeats = gr.Number(1, precision=0, label="Regularisation repeats", elem_id="anydressing_lora_reg_repeats")
        tensorboard = gr.Checkbox(False, label="TensorBoard log (<name>-tensorboard; needs the tensorboard package)",
                                  elem_id="anydressing_lora_tensorboard")  # fmt: skip
    with gr.Row():
        sample_every = gr.Number(10, precision=0, label="Sample every N epochs (0 = never)")
        sample_prompt = gr.Textbox("", label="Sample prompt (empty: the first caption)")
        resume = gr.Checkbox(True, label="Resume an interrupted run of this name (from its -state folder)")
    return TrainSettings(
        preset,
        rank,
        alpha,
        network,
        epochs,
        lr,
        batch,
        resolution,
        precision,
        checkpointing,
        train_text,
        min_snr,
        noise_offset,
        masked,
        buckets,
        caption_dropout,
        shuffle_tags,
        keep_tags,
        reg_dir,
        reg_repeats,
        tensorboard,
        sample_every,
        sample_prompt,
        resume,
    )


def _train_run() -> TrainRun:
    with gr.Row():
        start = gr.Button("Start training", variant="primary", elem_id="anydressing_lora_start")
        interrupt = gr.Button("Interrupt", elem_id="anydressing_lora_interrupt")
        watch = gr.Button("Show progress of the running training")
    progress = gr.Markdown(elem_id="anydressing_lora_progress")
    with gr.Row():
        loss_plot = gr.LinePlot(x="step", y="loss", title="Loss", **plot_size(500, 260),
                                elem_id="anydressing_lora_loss")  # fmt: skip
        samples = gr.Gallery(label="Samples", columns=4, height=260, elem_id="anydressing_lora_samples")
    final = gr.Markdown(elem_id="anydressing_lora_final")
    return TrainRun(start, interrupt, watch, progress, loss_plot, samples, final)
