"""Memory savers for LoRA training on an ldm UNet, as instance patches that come off exactly.

ldm's own gradient checkpointing (`use_checkpoint` / `checkpoint` flags, which the WebUI's SD1 config
turns on) is a reentrant autograd Function that differentiates only the block's own parameters: a
LoRA patched onto the block's Linears would get no gradient. So during training those flags are
switched off and, when asked, torch's non-reentrant checkpoint wraps each transformer block and
ResBlock instead (it sees every parameter). SDPA replaces ldm's einsum attention on CrossAttention
instances for headless runs; in the WebUI, its own class-level attention optimisation stays.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import sdp_attention
from .forward_patch import ForwardPatch

CHECKPOINT_FLAGS = ("checkpoint", "use_checkpoint")
CHECKPOINTED = ("BasicTransformerBlock", "ResBlock")


@contextmanager
def training_patches(unet: nn.Module, *, gradient_checkpointing: bool, sdpa: bool) -> Iterator[None]:
    """ldm's checkpoint flags off (restored as found), torch checkpointing and SDPA patched on when asked."""
    flags = [
        (m, flag, getattr(m, flag))
        for m in unet.modules()
        for flag in CHECKPOINT_FLAGS
        if isinstance(getattr(m, flag, None), bool)
    ]
    patches: list[ForwardPatch] = []
    try:
        for module, flag, _ in flags:
            setattr(module, flag, False)
        for module in unet.modules():
            name = type(module).__name__
            if gradient_checkpointing and name in CHECKPOINTED:
                patches.append(ForwardPatch(module, _checkpointed))
        if sdpa:
            patches += sdp_attention(unet)
        yield
    finally:
        for patch in reversed(patches):
            patch.restore()
        for module, flag, value in flags:
            setattr(module, flag, value)


def _checkpointed(inner):
    def forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # sampling: nothing to recompute
            return inner(*args, **kwargs)
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    return forward
