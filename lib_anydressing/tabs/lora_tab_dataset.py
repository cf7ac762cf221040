"""Handlers of the 'Train garment LoRA' tab's first two sections: import photos into the dataset folder,
show it, edit its captions. The logic is in garment_lora/; lora_tab.py wires these to the components.

No `from __future__ import annotations` here: gradio finds the `gr.SelectData` parameter by its annotation.
"""

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import gradio as gr

from ..files.images import ImageInputError
from ..garment_lora import captions as cap
from ..garment_lora.dataset import ImportOptions, dataset_images, folder_sources
from ..garment_lora.dataset import import_images as run_import
from ..segment.sam_models import SamModelError, find_sam_files
from ..segment.segmenter import GRABCUT, Segmenter
from .lora_tab_layout import DatasetPanel
from .segment_tab import SEGMENTER

DatasetViews = tuple[list[str], list[tuple[str, str]], list[list[Any]]]  # LoraLayout.dataset_views' values
Sources = str | list[tuple[str, Path]] | None  # a folder, or uploads as (the user's file name, temp file)


@dataclass(frozen=True)
class ImportSettings:
    """The values of the import controls, which gradio hands a handler positionally: `ImportSettings(*values)`
    for the components `inputs(panel)` lists, the DatasetPanel's of the same names, in this order."""

    dataset_dir: str
    background: str
    sam_model: str
    size: float
    shape: str
    margin: float
    trigger: str
    class_word: str
    tagger_dir: str
    threshold: float

    @classmethod
    def inputs(cls, panel: DatasetPanel) -> list[gr.components.Component]:
        return [getattr(panel, f.name) for f in fields(cls)]


class DatasetImport:
    """The two Import buttons' handlers; `sam_dirs` finds the SAM model the import segments with. Each
    returns the import note, the report's rows, then the dataset's views."""

    def __init__(self, sam_dirs: Callable[[], list[Path]]) -> None:
        self.sam_dirs = sam_dirs

    def from_folder(self, progress: gr.Progress = gr.Progress(), *values: Any) -> tuple:  # noqa: B008
        """`values`: the source folder, then ImportSettings. `progress` comes first because gradio tracks
        (shows) a Progress only in a parameter before `*values`."""
        source, *settings = values
        return self._import(source, ImportSettings(*settings), progress)

    def from_uploads(self, files: list[Any] | None, *values: Any) -> tuple:
        """`files`: gradio's temp files; the report names them by the user's file names."""
        named = None if not files else [(Path(getattr(f, "orig_name", "") or f.name).name, Path(f.name)) for f in files]
        return self._import(named, ImportSettings(*values))

    def _import(self, sources: Sources, s: ImportSettings, progress: gr.Progress | None = None) -> tuple:
        try:
            target = Path(s.dataset_dir.strip())
            if sources is None:
                raise ValueError("no photos uploaded")
            if not isinstance(sources, list):
                source = Path(sources.strip())
                if source.resolve() == target.resolve():
                    raise ValueError("the source folder is the dataset folder")
                sources = folder_sources(source)
            segmenter, note = self._segmenter(s.sam_model)
            make_caption, caption_note = cap.captioner(s.trigger, s.class_word, s.tagger_dir, float(s.threshold))
            options = ImportOptions(int(s.size), s.background, float(s.margin), s.shape == "square")
            report = None if progress is None else lambda i, n, what: progress((i, n), desc=what)
            rows = run_import(sources, target, options, segmenter, make_caption, report)
        except (ValueError, ImageInputError, OSError) as e:
            return (f"⚠ Nothing imported: {e}", [["", ""]], *show_dataset(s.dataset_dir))
        imported = sum(r.saved is not None for r in rows)
        text = f"Imported {imported} of {len(rows)} files into {target}; {caption_note}{note}"
        return (text, [[r.name, r.result] for r in rows], *show_dataset(s.dataset_dir))

    def _segmenter(self, choice: str) -> tuple[Segmenter, str]:
        """The shared segmenter with the chosen SAM model (one SAM per process, shared with the Segment tab),
        or a model-free one for GrabCut (leaving the Segment tab's model loaded); a note on a fallback."""
        if choice == GRABCUT:
            return Segmenter(), ""
        try:
            SEGMENTER.load(find_sam_files(self.sam_dirs()).get(choice))
        except (SamModelError, RuntimeError) as e:
            return Segmenter(), f" (SAM could not load: {e}; GrabCut was used)"
        return SEGMENTER, ""


def show_dataset(folder: str) -> DatasetViews:
    """The folder's images (the gallery's paths, then the gallery with captions) and its tag counts."""
    images = dataset_images(Path(folder.strip()))
    texts = {p: cap.read_caption(p) for p in images}
    tags = cap.tag_counts(texts.values()).most_common()
    return (
        [str(p) for p in images],
        [(str(p), f"{p.name}: {texts[p]}") for p in images],
        [list(t) for t in tags] or [["", ""]],
    )


def select_image(image_paths: list[str], evt: gr.SelectData) -> tuple[str, str]:
    """The clicked image's path and caption, into the editor."""
    if not image_paths or evt.index >= len(image_paths):
        return "", ""
    path = Path(image_paths[evt.index])
    return str(path), cap.read_caption(path)


def save_caption(image: str, text: str, folder: str) -> tuple:
    """The editor's caption into the image's .txt; a note, then the dataset's views."""
    if not image or not Path(image).is_file():
        return ("Select an image in the gallery first.", *show_dataset(folder))
    cap.write_caption(Path(image), text)
    return (f"Saved {cap.caption_path(Path(image)).name}", *show_dataset(folder))


def add_to_end(folder: str, what: str, replacement: str, image: str) -> tuple:
    return _edit_all(folder, what, image, lambda t: cap.add_tag(t, what))


def add_to_front(folder: str, what: str, replacement: str, image: str) -> tuple:
    return _edit_all(folder, what, image, lambda t: cap.add_tag(t, what, front=True))


def remove_from_all(folder: str, what: str, replacement: str, image: str) -> tuple:
    return _edit_all(folder, what, image, lambda t: cap.remove_tag(t, what))


def replace_in_all(folder: str, what: str, replacement: str, image: str) -> tuple:
    return _edit_all(folder, what, image, lambda t: cap.replace_tag(t, what, replacement))


def _edit_all(folder: str, what: str, image: str, edit: Callable[[str], str]) -> tuple:
    """`edit` on every caption of the folder (the batch buttons share their inputs, so all take
    `replacement`); a note, the selected image's caption as it is now, then the dataset's views."""
    if not cap.split_tags(what):
        return ("Type a tag first.", gr.update(), *show_dataset(folder))
    changed = cap.edit_all(Path(folder.strip()), edit)
    current = cap.read_caption(Path(image)) if image else gr.update()
    return (f"{changed} caption(s) changed", current, *show_dataset(folder))
