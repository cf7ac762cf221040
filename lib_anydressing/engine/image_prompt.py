"""IMAGDressing's image prompt: CLIP-H image features -> Resampler -> GarmentsNet cross-attention context.

The Resampler (IP-Adapter-plus's perceiver) is rebuilt here under IMAGDressing's key names, so its
`proj.*` weights load as they are. The CLIP vision tower is the user's local copy, in transformers
format (e.g. IP-Adapter's `models/image_encoder`); nothing is downloaded, and its weights are read
without running pickled code (`pretrained.load_pretrained`). Without it, the empty-prompt embedding
stands in, and the caller is told so.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ..files.pretrained import load_pretrained

if TYPE_CHECKING:
    from .checkpoint import AnyDressingModel


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
        encoder_dir = Path(encoder_dir)
        try:
            from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

            self.vision = load_pretrained(encoder_dir, CLIPVisionModelWithProjection)
            if (encoder_dir / "preprocessor_config.json").is_file():
                self.processor = CLIPImageProcessor.from_pretrained(encoder_dir, local_files_only=True)
            else:  # IP-Adapter's image_encoder has none; the defaults are OpenAI CLIP's, at the model's size
                size = self.vision.config.image_size
                self.processor = CLIPImageProcessor(
                    size={"shortest_edge": size}, crop_size={"height": size, "width": size}
                )
        except (OSError, ValueError, ImportError) as e:  # load_pretrained's WeightsFileError is a ValueError
            raise ImagePromptError(f"no usable CLIP image encoder in '{encoder_dir}': {e}") from e
        width = self.vision.config.hidden_size
        if resampler.proj_in.in_features != width:
            raise ImagePromptError(
                f"the image encoder in '{encoder_dir}' is {width} wide; this model's Resampler needs "
                f"{resampler.proj_in.in_features} (CLIP-H is 1280)"
            )
        self.resampler = resampler

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> Tensor:
        """(N, num_queries, output_dim): the penultimate CLIP hidden states through the Resampler."""
        pixels = self.processor(images, return_tensors="pt")["pixel_values"]
        hidden = self.vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        return self.resampler(hidden)


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
