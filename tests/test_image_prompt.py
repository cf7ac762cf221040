"""IMAGDressing's image prompt: our Resampler against diffusers' by value, and a real (tiny) CLIP encoder."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lib_anydressing.engine import AnyDressingModel, ModelInfo
from lib_anydressing.engine.image_prompt import ImagePromptEncoder, ImagePromptError, Resampler, garment_context
from lib_anydressing.engine.sd_unet import reinitialise

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

SIZES = {"dim": 32, "depth": 2, "dim_head": 8, "heads": 4, "num_queries": 5, "embedding_dim": 24, "output_dim": 16}


def _to_diffusers(weights):
    """IP-Adapter / IMAGDressing Resampler names -> diffusers IPAdapterPlusImageProjection names."""
    out = {}
    for key, t in weights.items():
        if not key.startswith("layers."):
            out[key] = t
            continue
        _, j, rest = key.split(".", 2)
        if rest == "0.to_kv.weight":
            k, v = t.chunk(2)
            out[f"layers.{j}.2.to_k.weight"], out[f"layers.{j}.2.to_v.weight"] = k, v
            continue
        rest = {
            "0.norm1.weight": "0.weight", "0.norm1.bias": "0.bias", "0.norm2.weight": "1.weight",
            "0.norm2.bias": "1.bias", "0.to_q.weight": "2.to_q.weight", "0.to_out.weight": "2.to_out.0.weight",
            "1.0.weight": "3.0.weight", "1.0.bias": "3.0.bias", "1.1.weight": "3.1.net.0.proj.weight",
            "1.3.weight": "3.1.net.2.weight",
        }[rest]  # fmt: skip
        out[f"layers.{j}.{rest}"] = t
    return out


def _resampler():
    r = Resampler(**SIZES, ff_mult=4)
    reinitialise(r, seed=3, std=0.2)
    return r.eval()


def test_resampler_equals_diffusers_ip_adapter_plus_projection():
    ours = _resampler()
    theirs = diffusers.models.embeddings.IPAdapterPlusImageProjection(
        embed_dims=SIZES["embedding_dim"], output_dims=SIZES["output_dim"], hidden_dims=SIZES["dim"],
        depth=SIZES["depth"], dim_head=SIZES["dim_head"], heads=SIZES["heads"], num_queries=SIZES["num_queries"],
    ).eval()  # fmt: skip
    theirs.load_state_dict(_to_diffusers(ours.state_dict()), strict=True)
    x = torch.randn(3, 7, SIZES["embedding_dim"])
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    rebuilt = Resampler.from_state_dict(ours.state_dict(), heads=SIZES["heads"])
    with torch.no_grad():
        assert torch.equal(rebuilt(x), ours(x))


@pytest.fixture
def clip_dir(tmp_path):
    config = transformers.CLIPVisionConfig(
        hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8, projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.CLIPVisionModelWithProjection(config).save_pretrained(tmp_path / "image_encoder")
    return tmp_path / "image_encoder"


def _images():
    return [Image.new("RGB", (40, 60), (200, 0, 0)), Image.new("RGBA", (64, 32), (0, 0, 200, 128))]


def test_image_prompt_from_local_clip_encoder(clip_dir):
    encoder = ImagePromptEncoder(clip_dir, _resampler())
    contexts = encoder(_images())
    assert contexts.shape == (2, SIZES["num_queries"], SIZES["output_dim"])
    assert (contexts[0] - contexts[1]).abs().max() > 1e-4  # each garment gets its own context


def test_bad_encoder_folders(clip_dir, tmp_path):
    with pytest.raises(ImagePromptError, match="no usable CLIP image encoder"):
        ImagePromptEncoder(tmp_path / "nothing", _resampler())
    narrow = Resampler(**{**SIZES, "embedding_dim": 1280}, ff_mult=4)
    with pytest.raises(ImagePromptError, match="24 wide; this model's Resampler needs 1280"):
        ImagePromptEncoder(clip_dir, narrow)


def test_garment_context_falls_back_and_says_so(clip_dir):
    info = ModelInfo(cross_attention="empty_prompt", resampler_heads=SIZES["heads"], origin="IMAGDressing-v1")
    model = AnyDressingModel(info, resampler_weights=_resampler().state_dict())
    empty = torch.zeros(1, 77, SIZES["output_dim"])
    context, note = garment_context(model, _images(), empty, None)
    assert context is empty and "no image encoder is set" in note
    context, note = garment_context(model, _images(), empty, clip_dir.parent / "missing")
    assert context is empty and "image prompt unavailable" in note
    context, note = garment_context(model, _images(), empty, clip_dir)
    assert context.shape == (2, SIZES["num_queries"], SIZES["output_dim"]) and "image prompt from" in note
    plain = AnyDressingModel(ModelInfo(cross_attention="empty_prompt"))
    assert garment_context(plain, _images(), empty, clip_dir) == (empty, "")
