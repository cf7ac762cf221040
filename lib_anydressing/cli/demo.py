"""`python -m lib_anydressing demo`: the engine end to end, with no download.

Loads two garment images (tests/data by default), encodes them, extracts their features with
GarmentsNet once, then samples the same noise twice with DDIM: plain, and dressed (garment 1 held to
the top half, garment 2 to the bottom half unless --no-regions). Writes a grid (garments | plain |
dressed | difference) and prints timings and whether the UNet came back bit-identical.

Built-in default: the training-free model on an SD1.5-topology UNet and an ldm VAE with seeded
random weights (no SD weights can be fetched here), so the pictures show the plumbing, not a person.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from PIL import Image, ImageChops, ImageOps

from ..engine import AnyDressingModel, CheckpointError, Dresser, load_checkpoint
from ..engine.image_prompt import garment_context
from ..files.images import ImageInputError, garment_tensor, side_by_side, tensor_to_image
from ..generation.model_files import model_dirs, resolve_model
from ..sd.architectures import SD15_UNET, TINY_VAE
from ..sd.checkpoint import LATENT_SCALE
from ..sd.random_models import build_unet, reinitialise
from ..sd.sampling import ddim_sample, guidance_layout

DATA = Path(__file__).resolve().parents[2] / "tests" / "data"
DEFAULT_GARMENTS = [DATA / "garment_top.png", DATA / "garment_trousers.png"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--garment", action="append", type=Path, help="garment image (repeat; default: tests/data)")
    parser.add_argument(
        "--model", default="training-free", help="'training-free', a .safetensors path, or a name in models/anydressing"
    )
    parser.add_argument("--size", type=int, nargs=2, default=(256, 384), metavar=("W", "H"), help="output size")
    parser.add_argument("--garment-size", type=int, nargs=2, default=(256, 192), metavar=("W", "H"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=6.0)
    parser.add_argument(
        "--garment-guidance", type=float, default=None, help="a separate garment scale (MagicClothing's 3-way guidance)"
    )
    parser.add_argument("--strength", type=float, default=None, help="lambda (default: the model's)")
    parser.add_argument("--no-regions", action="store_true", help="let every garment act on the whole image")
    parser.add_argument(
        "--image-encoder", type=Path, default=None, help="local CLIP-H image encoder folder, for IMAGDressing models"
    )
    parser.add_argument("--model-channels", type=int, default=64, help="UNet width of the random model (SD1.5: 320)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/anydressing/demo.png"))


def main(args: argparse.Namespace) -> int:
    try:
        path = resolve_model(args.model, model_dirs())
        model = AnyDressingModel.training_free() if path is None else load_checkpoint(path)
        images = [Image.open(p) for p in (args.garment or DEFAULT_GARMENTS)]
        garments = [garment_tensor(im, tuple(args.garment_size))[0] for im in images]
    except (CheckpointError, ImageInputError, OSError) as e:
        print(f"error: {e}")
        return 2
    for size in (*args.size, *args.garment_size):
        if size % 64:
            print(f"error: sizes must be multiples of 64, got {size}")
            return 2
    from ldm.modules.diffusionmodules.model import Decoder, Encoder

    torch.manual_seed(args.seed)
    unet = build_unet(SD15_UNET, model_channels=args.model_channels, seed=args.seed)
    encoder, decoder = Encoder(**TINY_VAE).eval(), Decoder(**TINY_VAE).eval()
    reinitialise(encoder, seed=args.seed + 1)
    reinitialise(decoder, seed=args.seed + 2)
    w, h = args.size
    lat_h, lat_w = h // 8, w // 8
    copies, cond_rows = guidance_layout(1, args.garment_guidance)
    context = torch.zeros(copies, 77, SD15_UNET["context_dim"])  # no text encoder here: an empty condition
    noise = torch.randn(1, 4, lat_h, lat_w, generator=torch.Generator().manual_seed(args.seed))

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(x, t, context=context)

    with torch.no_grad():
        probe = unet(torch.cat([noise] * copies), torch.full((copies,), 500.0), context=context)
        latents = encoder(torch.stack(garments))[:, :4] * LATENT_SCALE
        start = time.perf_counter()
        empty_prompt = context[:1]  # no text encoder here: zeros stand in for the empty-prompt embedding
        garment_ctx, note = garment_context(model, images, empty_prompt, args.image_encoder)
        features = model.garments_net(unet).extract(latents, context=garment_ctx)
        extract_s = time.perf_counter() - start
        start = time.perf_counter()
        guide = {"steps": args.steps, "guidance": args.guidance, "garment_guidance": args.garment_guidance}
        plain = ddim_sample(eps, noise, **guide)
        plain_s = (time.perf_counter() - start) / args.steps
        regions = None if args.no_regions else _halves(len(garments), lat_h, lat_w)
        strength = model.info.default_strength if args.strength is None else args.strength
        start = time.perf_counter()
        with Dresser(unet, features, model.projections, strength=strength, regions=regions) as dresser:
            dresser.cond_rows = cond_rows  # the unconditional row never sees the garments: eq. 16
            dressed = ddim_sample(eps, noise, **guide)
        dressed_s = (time.perf_counter() - start) / args.steps
        restored = torch.equal(unet(torch.cat([noise] * copies), torch.full((copies,), 500.0), context=context), probe)
        pictures = decoder(torch.cat([plain, dressed]) / LATENT_SCALE)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    _grid([tensor_to_image(g) for g in garments], tensor_to_image(pictures[0]), tensor_to_image(pictures[1])).save(
        args.out
    )
    print(f"model: {model.info.origin}, {len(garments)} garments, {w}x{h}, {args.steps} DDIM steps")
    if model.info.license:
        print(f"license: {model.info.license}")
    if note:
        print(f"note: {note}")
    print(f"garment features (one batched pass): {extract_s * 1000:.0f} ms")
    print(f"plain step: {plain_s * 1000:.0f} ms, dressed step: {dressed_s * 1000:.0f} ms ({dressed_s / plain_s:.2f}x)")
    print(f"dressed differs from plain by {(dressed - plain).abs().mean():.4f} (mean |latent difference|)")
    print(f"UNet restored bit-identically: {'yes' if restored else 'NO'}")
    print(f"wrote {args.out}")
    return 0 if restored else 1


def _halves(n: int, h: int, w: int) -> list[torch.Tensor | None]:
    """Garment 1 on the top half, garment 2 on the bottom half, any others everywhere."""
    top, bottom = torch.zeros(h, w), torch.zeros(h, w)
    top[: h // 2] = 1
    bottom[h // 2 :] = 1
    return [top, bottom, *([None] * (n - 2))][:n]


def _grid(garments: list[Image.Image], plain: Image.Image, dressed: Image.Image) -> Image.Image:
    """garments (stacked) | plain | dressed | |dressed - plain| (contrast-stretched)."""
    h = plain.height
    diff = ImageOps.autocontrast(ImageChops.difference(dressed, plain).convert("L")).convert("RGB")
    column = Image.new("RGB", (max(g.width for g in garments), h), "white")
    y = 0
    for g in garments:
        g = g.resize((g.width * (h // len(garments)) // g.height, h // len(garments)))
        column.paste(g, (0, y))
        y += g.height
    return side_by_side([column, plain, dressed, diff])
