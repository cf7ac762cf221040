"""Finding and loading Segment Anything checkpoints safely, the variant told by tensor shapes, not names.

`.pth` files are read with `torch.load(weights_only=True, map_location="cpu")`: a file that holds
anything but tensors is refused, never executed.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from ..files.weights import WeightsFileError, load_tensors

# image encoder width -> (variant, depth) of the three original SAM ViTs
VIT_VARIANTS = {768: ("vit_b", 12), 1024: ("vit_l", 24), 1280: ("vit_h", 32)}
SAM_SUFFIXES = (".pth", ".pt", ".safetensors")


class SamModelError(WeightsFileError):
    """A SAM file that cannot be used, with a message meant for the user."""


def find_sam_files(dirs: Iterable[Path]) -> dict[str, Path]:
    """name -> path of every SAM checkpoint in `dirs` (first folder wins a clash)."""
    found: dict[str, Path] = {}
    for d in dirs:
        if Path(d).is_dir():
            for path in sorted(Path(d).iterdir()):
                if path.suffix in SAM_SUFFIXES:
                    found.setdefault(path.name, path)
    return found


def read_state_dict(path: Path) -> dict[str, Tensor]:
    return load_tensors(path, error=SamModelError, wrappers=("model",))


def detect_variant(state_dict: dict[str, Tensor]) -> str:
    """vit_b / vit_l / vit_h from the image encoder's width and depth; sam_hq and mobile_sam by their keys."""
    if any(k.startswith("mask_decoder.hf_token") for k in state_dict):
        return "sam_hq"
    if any(k.startswith("image_encoder.layers.") for k in state_dict):  # TinyViT stages
        return "mobile_sam"
    pos = state_dict.get("image_encoder.pos_embed")
    if pos is None:
        raise SamModelError("not a Segment Anything checkpoint (no image_encoder.pos_embed)")
    width = pos.shape[-1]
    depth = len({k.split(".")[2] for k in state_dict if k.startswith("image_encoder.blocks.")})
    if width not in VIT_VARIANTS or VIT_VARIANTS[width][1] != depth:
        return "custom"
    return VIT_VARIANTS[width][0]


def build_sam(state_dict: dict[str, Tensor]) -> tuple[nn.Module, str]:
    """The model for these weights, built with segment-anything's own classes (or its HQ/Mobile forks)."""
    variant = detect_variant(state_dict)
    if variant in ("vit_b", "vit_l", "vit_h"):
        from segment_anything import sam_model_registry

        with torch.device("meta"):
            model = sam_model_registry[variant]()
    elif variant in ("sam_hq", "mobile_sam"):
        package = {"sam_hq": "segment_anything_hq", "mobile_sam": "mobile_sam"}[variant]
        try:
            module = __import__(package)
        except ImportError as e:
            raise SamModelError(f"this is a {variant} checkpoint: install the '{package}' package to use it") from e
        key = "vit_t" if variant == "mobile_sam" else _hq_size(state_dict)
        with torch.device("meta"):
            model = module.sam_model_registry[key]()
    else:
        model = _custom_vit(state_dict)
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:
        raise SamModelError(f"the weights do not fit a {variant} model: {str(e).splitlines()[0]}") from e
    return model.eval(), variant


def _hq_size(state_dict: dict[str, Tensor]) -> str:
    width = state_dict["image_encoder.pos_embed"].shape[-1]
    return VIT_VARIANTS.get(width, ("vit_h", 0))[0]


def _custom_vit(state_dict: dict[str, Tensor]) -> nn.Module:
    """A ViT SAM of another size (as small test models are): heads and global-attention blocks are read
    off the relative position tables (a windowed block's covers 2 * 14 - 1 positions, a global one more)."""
    from segment_anything.build_sam import _build_sam

    width = state_dict["image_encoder.pos_embed"].shape[-1]
    depth = len({k.split(".")[2] for k in state_dict if k.startswith("image_encoder.blocks.")})
    tables = [state_dict[f"image_encoder.blocks.{i}.attn.rel_pos_h"] for i in range(depth)]
    heads = width // tables[0].shape[1]
    global_layers = [i for i, table in enumerate(tables) if table.shape[0] > 2 * 14 - 1]
    with torch.device("meta"):
        return _build_sam(width, depth, heads, global_layers)
