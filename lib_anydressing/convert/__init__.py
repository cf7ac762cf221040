"""Converters from the public MagicClothing and IMAGDressing checkpoints to this extension's format."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..engine import save_checkpoint
from . import imagdressing, magicclothing
from .common import Conversion
from .safe_load import ConversionError

CONVERTERS: dict[str, Callable[[list[Path]], Conversion]] = {
    "magicclothing": magicclothing.convert,
    "imagdressing": imagdressing.convert,
}


def convert_to_file(kind: str, inputs: list[Path], out: Path, *, overwrite: bool = False) -> Conversion:
    """Convert and write `out`; never replaces an existing file unless asked."""
    if kind not in CONVERTERS:
        raise ConversionError(f"unknown source '{kind}': one of {', '.join(CONVERTERS)}")
    if out.suffix != ".safetensors":
        raise ConversionError(f"the output must be a .safetensors file, not '{out.name}'")
    if out.exists() and not overwrite:
        raise ConversionError(f"'{out}' exists (pass --overwrite to replace it)")
    conversion = CONVERTERS[kind](inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".part")
    save_checkpoint(conversion.model, tmp)
    tmp.replace(out)  # a crash mid-write never leaves a truncated model in the list
    return conversion


def convert_dropped(folder: Path) -> list[str]:
    """Convert peer checkpoints dropped into a model folder, once; returns one message per file.

    Recognised: IMAGDressing*.pt files, and MagicClothing's garment_extractor.safetensors +
    ip_layer.pth, loose in the folder or in a subfolder.
    """
    jobs: list[tuple[str, list[Path], Path]] = []
    for pt in sorted(folder.glob("IMAGDressing*.pt")):
        jobs.append(("imagdressing", [pt], pt.with_suffix(".safetensors")))
    for candidate in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
        if (candidate / magicclothing.EXTRACTOR).is_file() and (candidate / magicclothing.IP_LAYER).is_file():
            name = "magicclothing" if candidate == folder else f"magicclothing-{candidate.name}"
            jobs.append(("magicclothing", [candidate], folder / f"{name}.safetensors"))
    messages = []
    for kind, inputs, out in jobs:
        if out.exists():
            continue
        try:
            convert_to_file(kind, inputs, out)
            messages.append(f"converted {inputs[0].name} ({kind}) to {out.name}")
        except ConversionError as e:
            messages.append(f"could not convert {inputs[0].name}: {e}")
    return messages
