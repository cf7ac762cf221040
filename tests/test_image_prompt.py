"""IMAGDressing's image prompt: our Resampler against diffusers' by value, and a real (tiny) CLIP encoder.

The encoder's weights go through `pretrained.load_pretrained`: a pickle that would run code is refused.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lib_anydressing.engine import AnyDressingModel, ModelInfo
from lib_anydressing.engine.image_prompt import ImagePromptEncoder, ImagePromptError, Resampler, garment_context
from lib_anydressing.files.pretrained import load_pretrained
from lib_anydressing.files.weights import WeightsFileError
from lib_anydressing.sd.random_models import reinitialise

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


def _vision_config():
    return transformers.CLIPVisionConfig(
        hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8, projection_dim=16,
    )  # fmt: skip


@pytest.fixture
def clip_dir(tmp_path):
    torch.manual_seed(0)
    transformers.CLIPVisionModelWithProjection(_vision_config()).save_pretrained(tmp_path / "image_encoder")
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


class _WritesMarker:
    """Unpickling this writes `marker`: what a hostile pytorch_model.bin would do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "pwned")


def test_a_pickle_that_runs_code_is_refused_and_not_run(tmp_path):
    folder, marker = tmp_path / "image_encoder", tmp_path / "pwned"
    model = transformers.CLIPVisionModelWithProjection(_vision_config())
    model.config.save_pretrained(folder)
    torch.save({**model.state_dict(), "payload": _WritesMarker(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(ImagePromptError, match="no usable CLIP image encoder.*refused and not loaded"):
        ImagePromptEncoder(folder, _resampler())
    assert not marker.exists()
    torch.load(folder / "pytorch_model.bin", weights_only=False)  # the control: a full unpickling does run it
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("file_name", ["model.safetensors", "pytorch_model.bin"])
def test_load_pretrained_fills_every_tensor_from_the_file(tmp_path, file_name):
    torch.manual_seed(1)
    saved = transformers.CLIPVisionModelWithProjection(_vision_config())
    saved.config.save_pretrained(tmp_path)
    weights = {k: v.contiguous() for k, v in saved.state_dict().items()}
    if file_name == "model.safetensors":
        save_file(weights, str(tmp_path / file_name))
    else:
        torch.save(weights, tmp_path / file_name)  # a plain state dict: what weights_only accepts
    loaded = load_pretrained(tmp_path, transformers.CLIPVisionModelWithProjection)
    assert type(loaded) is transformers.CLIPVisionModelWithProjection and not loaded.training
    assert loaded.state_dict().keys() == weights.keys()
    for key, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, weights[key]), key


def test_load_pretrained_names_the_folder_when_the_weights_do_not_fit(tmp_path):
    model = transformers.CLIPVisionModelWithProjection(_vision_config())
    folder = re.escape(str(tmp_path))
    with pytest.raises(WeightsFileError, match=f"'{folder}' has no config\\.json"):
        load_pretrained(tmp_path, transformers.CLIPVisionModelWithProjection)
    model.config.save_pretrained(tmp_path)
    with pytest.raises(WeightsFileError, match=f"'{folder}' has none of model\\.safetensors, pytorch_model\\.bin"):
        load_pretrained(tmp_path, transformers.CLIPVisionModelWithProjection)
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(
        {k: v for k, v in weights.items() if k != "visual_projection.weight"}, str(tmp_path / "model.safetensors")
    )
    with pytest.raises(WeightsFileError, match=f"for the config in '{folder}': missing visual_projection\\.weight"):
        load_pretrained(tmp_path, transformers.CLIPVisionModelWithProjection)
    save_file({**weights, "visual_projection.weight": torch.zeros(3, 24)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsFileError, match=f"does not fit the CLIPVisionModelWithProjection of '{folder}'"):
        load_pretrained(tmp_path, transformers.CLIPVisionModelWithProjection)


def test_a_full_clip_folder_serves_as_the_image_encoder(tmp_path):
    """As with from_pretrained: the vision config is taken from the CLIP config, the text weights are left."""
    text = {"vocab_size": 50, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    config = transformers.CLIPConfig(text_config={**text, "num_attention_heads": 2}, projection_dim=16)
    config.vision_config = _vision_config()
    torch.manual_seed(2)
    full = transformers.CLIPModel(config)
    full.save_pretrained(tmp_path, safe_serialization=True)
    vision = load_pretrained(tmp_path, transformers.CLIPVisionModelWithProjection)
    for key, tensor in vision.state_dict().items():
        assert torch.equal(tensor, full.state_dict()[key]), key


def test_preprocessing_is_the_folders_or_openai_clips_at_the_encoder_size(clip_dir):
    processor = ImagePromptEncoder(clip_dir, _resampler()).processor
    assert processor.size == {"shortest_edge": 32} and processor.crop_size == {"height": 32, "width": 32}
    assert processor.image_mean == transformers.CLIPImageProcessor().image_mean  # OpenAI CLIP's mean and std
    transformers.CLIPImageProcessor(size={"shortest_edge": 40}, image_mean=[0.5, 0.5, 0.5]).save_pretrained(clip_dir)
    processor = ImagePromptEncoder(clip_dir, _resampler()).processor
    assert processor.size == {"shortest_edge": 40} and processor.image_mean == [0.5, 0.5, 0.5]
