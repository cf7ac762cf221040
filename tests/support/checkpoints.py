"""A tiny SD1.x model written as a real single-file checkpoint, with its tokenizer's files, for CLI tests."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from lib_anydressing.sd.checkpoint import original_state_dict
from lib_anydressing.sd.random_models import tiny_stable_diffusion


def write_tiny_checkpoint(folder: Path, name: str = "tiny.safetensors", seed: int = 4) -> tuple[Path, Path]:
    """(the .safetensors file in the original layout, the tokenizer folder)."""
    model = tiny_stable_diffusion(seed=seed)
    save_file({k: v.contiguous() for k, v in original_state_dict(model).items()}, str(folder / name))
    model.tokenizer.save_pretrained(str(folder / "tokenizer"))
    return folder / name, folder / "tokenizer"
