"""A pose (or any other) ControlNet for the batch command: the WebUI's ControlNet model files run through
diffusers' ControlNetModel, their residuals added to the ldm UNet as ControlNet adds them.

Files: the original layout the WebUI extensions load (`control_model.*` or bare, .safetensors/.pth),
converted by diffusers' own converter (convert_from_ckpt.convert_controlnet_checkpoint) with SD1.x's
cldm_v15 config sized from the file, or a file in diffusers' layout. SD1.x ControlNets only.

ControlNet adds its residuals to the skip connections only (each output block receives cat([h, skip]): the
residual goes on the skip part) and to the middle block's output: forward pre-hooks on the output blocks and
a hook on the middle block, removed after each image batch, leave the encoder path untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from ..files.weights import load_tensors
from ..sd.architectures import SDCheckpointError

PREFIX = "control_model."


class ControlNetError(ValueError):
    """A ControlNet file that cannot be used, with a message meant for the user."""


def load_controlnet(path: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """diffusers' ControlNetModel from a ControlNet file (see the module docstring)."""
    from diffusers import ControlNetModel
    from diffusers.pipelines.stable_diffusion.convert_from_ckpt import convert_controlnet_checkpoint

    state = load_tensors(path, error=ControlNetError, wrappers=("state_dict",))
    if "controlnet_cond_embedding.conv_in.weight" in state:  # already diffusers' layout
        config = _config({_ldm_name(k): tuple(v.shape) for k, v in state.items()}, path.name)
        model = ControlNetModel(**_diffusers_config(config))
        model.load_state_dict(state)
        return model.to(dtype).eval().requires_grad_(False)
    bare = {k.removeprefix(PREFIX): v for k, v in state.items()}
    if "input_hint_block.0.weight" not in bare:
        raise ControlNetError(f"'{path.name}' is not a ControlNet (no input_hint_block)")
    config = _config({k: tuple(v.shape) for k, v in bare.items()}, path.name)
    try:
        model = convert_controlnet_checkpoint(bare, _original_config(config), str(path), 512, False, False)
    except (KeyError, RuntimeError) as e:
        raise ControlNetError(f"'{path.name}' does not fit an SD1.x ControlNet: {e}") from None
    return model.to(dtype).eval().requires_grad_(False)


def _config(shapes: dict[str, tuple[int, ...]], name: str) -> dict:
    """cldm_v15's control_stage_config at the file's widths (SD1.x: 8 heads, 1 transformer block)."""
    from ..sd.checkpoint import unet_config

    try:
        unet = unet_config(shapes)
    except SDCheckpointError as e:
        raise ControlNetError(f"'{name}': {e}") from None
    hint = shapes.get("input_hint_block.0.weight") or shapes["controlnet_cond_embedding.conv_in.weight"]
    return {**unet, "hint_channels": hint[1], "num_heads": 8}


def _ldm_name(diffusers_key: str) -> str:
    from ..sd.unet_keys import diffusers_to_ldm

    try:
        return diffusers_to_ldm(diffusers_key)
    except KeyError:
        return diffusers_key


def _diffusers_config(config: dict) -> dict:
    from diffusers.pipelines.stable_diffusion.convert_from_ckpt import create_unet_diffusers_config

    out = create_unet_diffusers_config(_original_config(config), image_size=512, controlnet=True)
    out.pop("sample_size", None)
    return out


def _original_config(control: dict) -> dict:
    """The parts of cldm_v15.yaml diffusers' converter reads: the control stage, and the VAE's levels (SD's 4)."""
    vae = {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}
    return {"model": {"params": {"control_stage_config": {"params": control}, "first_stage_config": {"params": vae}}}}


def pose_tensor(image: Image.Image, size_wh: tuple[int, int]) -> Tensor:
    """(3, H, W) in [0, 1]: the pose image scaled to cover the target and centre-cropped (the WebUI's
    "Crop and Resize")."""
    w, h = size_wh
    scale = max(w / image.width, h / image.height)
    resized = image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    left, top = (resized.width - w) // 2, (resized.height - h) // 2
    pixels = np.asarray(resized.crop((left, top, left + w, top + h)), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1)


@contextmanager
def control_residuals(unet: nn.Module, residuals: dict[str, object]) -> Iterator[None]:
    """While open, each UNet call adds `residuals["down"]` (one per input block, in order) to the skips its output
    blocks receive and `residuals["mid"]` to the middle block's output; an empty dict adds nothing."""

    def skip_hook(index: int):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            down = residuals.get("down")
            if not down:
                return None
            residual = down[len(down) - 1 - index]  # output block i takes the skip of input block n-1-i
            x = args[0]
            split = x.shape[1] - residual.shape[1]
            x = torch.cat([x[:, :split], x[:, split:] + residual], dim=1)
            return (x, *args[1:])

        return hook

    def mid_hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        mid = residuals.get("mid")
        return None if mid is None else output + mid

    handles = [block.register_forward_pre_hook(skip_hook(i)) for i, block in enumerate(unet.output_blocks)]
    handles.append(unet.middle_block.register_forward_hook(mid_hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
