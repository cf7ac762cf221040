"""IMAGDressing's image prompt: CLIP-H image features -> Resampler -> GarmentsNet cross-attention context.

The Resampler (IP-Adapter-plus's perceiver) is rebuilt here under IMAGDressing's key names, so its
`proj.*` weights load as they are. The CLIP vision tower is the user's local copy, in transformers
format (e.g. IP-Adapter's `models/image_encoder`); nothing is downloaded. Without it, the
empty-prompt embedding stands in, and the caller is told so.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

if TYPE_CHECKING:
    from .checkpoint import AnyDressingModel

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImagePromptError(ValueError):
    """The image encoder cannot be used, with a message meant for the user."""


class _PerceiverAttention(nn.Module):
    def __init__(self, dim: int, dim_head: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim_head * heads, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim_head * heads, bias=False)
        self.to_out = nn.Linear(dim_head * heads, dim, bias=False)

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:
        """The latent queries attend to the image tokens and to themselves."""
        x, latents = self.norm1(x), self.norm2(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (self.to_q(latents), k, v))
        return self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(-2))


class Resampler(nn.Module):
    """num_queries learnt latents that read CLIP image tokens; output (B, num_queries, output_dim)."""

    def __init__(
        self, dim: int, depth: int, dim_head: int, heads: int, num_queries: int, embedding_dim: int,
        output_dim: int, ff_mult: int,
    ) -> None:  # fmt: skip
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    _PerceiverAttention(dim, dim_head, heads),
                    nn.Sequential(
                        nn.LayerNorm(dim),
                        nn.Linear(dim, dim * ff_mult, bias=False),
                        nn.GELU(),
                        nn.Linear(dim * ff_mult, dim, bias=False),
                    ),
                ]
            )
            for _ in range(depth)
        )

    @classmethod
    def from_state_dict(cls, weights: dict[str, Tensor], heads: int) -> Resampler:
        """Sizes read off the tensors; the head count is not in them, so it comes from metadata."""
        dim = weights["latents"].shape[-1]
        depth = len({k.split(".")[1] for k in weights if k.startswith("layers.")})
        inner = weights["layers.0.0.to_q.weight"].shape[0]
        resampler = cls(
            dim=dim,
            depth=depth,
            dim_head=inner // heads,
            heads=heads,
            num_queries=weights["latents"].shape[1],
            embedding_dim=weights["proj_in.weight"].shape[1],
            output_dim=weights["proj_out.weight"].shape[0],
            ff_mult=weights["layers.0.1.1.weight"].shape[0] // dim,
        )
        resampler.load_state_dict(weights, strict=True)
        return resampler.eval().requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        latents = self.latents.expand(x.shape[0], -1, -1)
        x = self.proj_in(x)
        for attention, feed_forward in self.layers:
            latents = attention(x, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))


class ImagePromptEncoder:
    """A local CLIP vision model (transformers format) plus a Resampler: garment images -> contexts."""

    def __init__(self, encoder_dir: str | Path, resampler: Resampler) -> None:
        try:
            from transformers import CLIPVisionModelWithProjection

            self.vision = CLIPVisionModelWithProjection.from_pretrained(str(encoder_dir), local_files_only=True)
        except (OSError, ValueError, ImportError) as e:
            raise ImagePromptError(f"no usable CLIP image encoder in '{encoder_dir}': {e}") from e
        self.vision.eval().requires_grad_(False)
        width = self.vision.config.hidden_size
        if resampler.proj_in.in_features != width:
            raise ImagePromptError(
                f"the image encoder in '{encoder_dir}' is {width} wide; this model's Resampler needs "
                f"{resampler.proj_in.in_features} (CLIP-H is 1280)"
            )
        self.resampler = resampler
        self.size = self.vision.config.image_size

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> Tensor:
        """(N, num_queries, output_dim): the penultimate CLIP hidden states through the Resampler."""
        pixels = torch.stack([_clip_pixels(im, self.size) for im in images])
        hidden = self.vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        return self.resampler(hidden)


def _clip_pixels(image: Image.Image, size: int) -> Tensor:
    """CLIP's preprocessing: shortest side to `size` (bicubic), centre crop, CLIP mean/std."""
    image = image.convert("RGB")
    scale = size / min(image.size)
    w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def garment_context(
    model: AnyDressingModel,
    images: list[Image.Image],
    empty_prompt: Tensor | None,
    encoder_dir: str | Path | None,
) -> tuple[Tensor | None, str]:
    """GarmentsNet's cross-attention context for these garments, and a note for the user.

    Models with an image-prompt Resampler get it from the local CLIP image encoder; without one
    (or with a broken one) they fall back to the empty prompt, and the note says so.
    """
    if model.info.cross_attention == "skip":
        return None, ""
    if model.resampler_weights is None:
        return empty_prompt, ""
    if encoder_dir is None:
        return empty_prompt, (
            f"{model.info.origin} was trained with a CLIP-H image prompt; no image encoder is set, "
            "so the empty prompt is used (garment fidelity may be lower)"
        )
    try:
        encoder = _encoder(model, encoder_dir)
    except (ImagePromptError, KeyError, RuntimeError, ZeroDivisionError) as e:
        return empty_prompt, f"image prompt unavailable ({e}); the empty prompt is used"
    return encoder(images), f"image prompt from the CLIP encoder in '{Path(encoder_dir).name}'"


_last_encoder: tuple[tuple, ImagePromptEncoder] | None = None


def _encoder(model: AnyDressingModel, encoder_dir: str | Path) -> ImagePromptEncoder:
    """The encoder for this model and folder, kept: loading CLIP-H takes seconds and gigabytes."""
    global _last_encoder
    key = (str(encoder_dir), id(model.resampler_weights))
    if _last_encoder is None or _last_encoder[0] != key:
        _last_encoder = None  # free the old one before loading the next
        resampler = Resampler.from_state_dict(model.resampler_weights, model.info.resampler_heads)
        _last_encoder = (key, ImagePromptEncoder(encoder_dir, resampler))
    return _last_encoder[1]
