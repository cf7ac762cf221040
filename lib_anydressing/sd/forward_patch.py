"""Explicit install/restore of a module's forward, on the instance only.

The WebUI swaps attention implementations at class level (sdp, xformers, sub-quadratic) and other
extensions override forwards on instances. A patch therefore wraps whatever forward is active at
call time, and restoring puts back exactly the instance state it found: the model's weights,
buffers and class are never touched, so outputs after restore are bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

Forward = Callable[..., Any]


class ForwardPatch:
    """Replaces `module.forward` with `make(inner)`, where `inner` calls the forward that was active."""

    def __init__(self, module: nn.Module, make: Callable[[Forward], Forward]) -> None:
        self.module = module
        self._previous = module.__dict__.get("forward")  # another extension's override, if any
        self._enabled = True
        wrapper = make(self._inner)

        def forward(*args: Any, **kwargs: Any) -> Any:
            if not self._enabled:
                return self._inner(*args, **kwargs)
            return wrapper(*args, **kwargs)

        self._forward = forward
        module.forward = forward

    def _inner(self, *args: Any, **kwargs: Any) -> Any:
        if self._previous is not None:
            return self._previous(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)

    def restore(self) -> None:
        """Undo the patch. If someone patched on top of us meanwhile, become a pass-through instead."""
        self._enabled = False
        if self.module.__dict__.get("forward") is not self._forward:
            return
        if self._previous is None:
            del self.module.forward
        else:
            self.module.forward = self._previous
