"""Captions of a dataset folder: comma-separated tags in `NNN.txt` beside `NNN.png`.

The first tags are the trigger word (what the user types to call the garment) and the class word
("shirt"); the rest describe what varies between photos, so the trigger absorbs what does not.
Batch edits work on tags as whole items, never on substrings ("red" does not touch "red dress").
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from .dataset import dataset_images


def split_tags(text: str) -> list[str]:
    return [t.strip() for t in text.replace("\n", ",").split(",") if t.strip()]


def join_tags(tags: Iterable[str]) -> str:
    return ", ".join(tags)


def varied_caption(caption: str, generator: torch.Generator, *, dropout: float, shuffle: bool, keep: int) -> str:
    """The caption one training step sees, as kohya's trainers vary it: dropped whole (the empty caption) with
    probability `dropout`, else its tags after the first `keep` (trigger and class word) in a random order.
    Draws from `generator` only for what is on, so a run without either draws what it always did."""
    if dropout and float(torch.rand((), generator=generator)) < dropout:
        return ""
    if not shuffle:
        return caption
    tags = split_tags(caption)
    kept, rest = tags[:keep], tags[keep:]
    return join_tags(kept + [rest[i] for i in torch.randperm(len(rest), generator=generator).tolist()])


def template_caption(trigger: str, class_word: str, tags: Iterable[str] = ()) -> str:
    """trigger, class word, then the tags that are neither, each once, in order."""
    out: list[str] = []
    for tag in [*split_tags(trigger), *split_tags(class_word), *tags]:
        if tag not in out:
            out.append(tag)
    return join_tags(out)


def add_tag(text: str, tag: str, front: bool = False) -> str:
    tags = split_tags(text)
    new = [t for t in split_tags(tag) if t not in tags]
    return join_tags(new + tags if front else tags + new)


def remove_tag(text: str, tag: str) -> str:
    gone = set(split_tags(tag))
    return join_tags(t for t in split_tags(text) if t not in gone)


def replace_tag(text: str, old: str, new: str) -> str:
    """Every `old` tag becomes `new` (or disappears when `new` is empty); duplicates are merged."""
    out: list[str] = []
    for t in split_tags(text):
        t = new.strip() if t == old.strip() else t
        if t and t not in out:
            out.append(t)
    return join_tags(out)


def caption_path(image: Path) -> Path:
    return image.with_suffix(".txt")


def read_caption(image: Path) -> str:
    path = caption_path(image)
    return path.read_text(encoding="utf-8").strip() if path.is_file() else ""


def write_caption(image: Path, text: str) -> None:
    caption_path(image).write_text(join_tags(split_tags(text)) + "\n", encoding="utf-8")


def read_captions(folder: Path) -> dict[Path, str]:
    return {image: read_caption(image) for image in dataset_images(folder)}


def edit_all(folder: Path, edit: Callable[[str], str]) -> int:
    """Apply `edit` to every caption of the folder; returns how many files changed."""
    changed = 0
    for image, text in read_captions(folder).items():
        new = edit(text)
        if split_tags(new) != split_tags(text):
            write_caption(image, new)
            changed += 1
    return changed


def tag_counts(captions: Iterable[str]) -> Counter[str]:
    """In how many captions each tag appears (a tag repeated within one caption counts once)."""
    return Counter(t for text in captions for t in dict.fromkeys(split_tags(text)))


def ss_tag_frequency(folder: Path) -> str:
    """kohya's `ss_tag_frequency` metadata: JSON {dataset folder name: {tag: count}}."""
    counts = tag_counts(read_captions(folder).values())
    return json.dumps({folder.name: dict(counts.most_common())}, ensure_ascii=False)


def captioner(trigger: str, class_word: str, tagger_dir: str = "", threshold: float = 0.35):
    """(picture -> caption, a note for the user). Tags come from the WD14 tagger in `tagger_dir` when it
    can run; otherwise, or when the folder is empty, the template caption alone, with the reason."""
    from .tagger import TaggerError, WD14Tagger

    def template(_picture) -> str:
        return template_caption(trigger, class_word)

    if not tagger_dir.strip():
        return template, "captions: the template (no WD14 tagger folder given)"
    try:
        tagger = WD14Tagger(Path(tagger_dir.strip()), threshold)
        tagger.session()
    except (TaggerError, OSError, ValueError) as e:
        return template, f"captions: the template, because the tagger cannot run: {e}"
    known = frozenset(split_tags(trigger) + split_tags(class_word))

    def tagged(picture) -> str:
        try:
            return template_caption(trigger, class_word, tagger.tags(picture, known))
        except TaggerError:  # one image the tagger cannot read keeps the template; the import goes on
            return template(picture)

    return tagged, "captions: WD14 tags"
