"""ldm's attention through torch's scaled_dot_product_attention, as A1111's default optimisation on torch 2
('sdp') and Forge run it: ldm's own einsum attention holds every attention matrix and is slower."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .forward_patch import ForwardPatch


def sdp_attention(unet: nn.Module) -> list[ForwardPatch]:
    """Every CrossAttention of an ldm UNet through SDPA (a masked call keeps ldm's path); restore with the
    patches. Benches use it so the plain baseline is not flattered against dressed layers, which call SDPA."""
    return [
        ForwardPatch(module, lambda inner, m=module: _sdp_forward(m, inner))
        for module in unet.modules()
        if type(module).__name__ == "CrossAttention" and hasattr(module, "to_q")
    ]


def _sdp_forward(attn: nn.Module, inner):
    def forward(x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        if mask is not None:
            return inner(x, context=context, mask=mask)
        ctx = x if context is None else context
        q, k, v = (
            t.unflatten(-1, (attn.heads, -1)).transpose(1, 2) for t in (attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx))
        )
        return attn.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(-2))

    return forward
