"""SD1.x single-file checkpoints: the original layout loads back bit-exactly; wrong files are named, not loaded."""

from __future__ import annotations

import gzip

import pytest
import torch
from safetensors.torch import save_file

from lib_anydressing.sd.architectures import SDCheckpointError
from lib_anydressing.sd.checkpoint import load_sd_checkpoint, original_state_dict
from lib_anydressing.sd.random_models import tiny_stable_diffusion
from lib_anydressing.sd.tokenizer import find_clip_tokenizer, tokenizer_from_bpe


@pytest.fixture(scope="module")
def tiny():
    return tiny_stable_diffusion(seed=1)


@pytest.fixture(scope="module")
def state(tiny):
    return {k: v.contiguous() for k, v in original_state_dict(tiny).items()}


def _assert_same_weights(a, b):
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), f"{name}.{key}"


def test_safetensors_and_ckpt_load_back_bit_exactly(tiny, state, tmp_path):
    save_file(state, str(tmp_path / "m.safetensors"))
    torch.save({"state_dict": state, "global_step": 470000}, tmp_path / "m.ckpt")  # the original .ckpt wrapping
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([321.0])
    with torch.no_grad():
        want = tiny.unet(x, t, context=tiny.encode_text(["a shirt"]))
    for name in ("m.safetensors", "m.ckpt"):
        loaded = load_sd_checkpoint(tmp_path / name, tokenizer=tiny.tokenizer)
        _assert_same_weights(tiny, loaded)
        assert loaded.prediction == "eps"
        with torch.no_grad():
            assert torch.equal(loaded.unet(x, t, context=loaded.encode_text(["a shirt"])), want)


def test_old_text_encoder_keys_and_v_prediction_yaml(tiny, state, tmp_path):
    """Older checkpoints lack transformers' `text_model.` level; a .yaml beside the file marks v-prediction."""
    old = {k.replace("transformer.text_model.", "transformer."): v for k, v in state.items()}
    assert old.keys() != state.keys()
    save_file(old, str(tmp_path / "old.safetensors"))
    (tmp_path / "old.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    loaded = load_sd_checkpoint(tmp_path / "old.safetensors", tokenizer=tiny.tokenizer)
    _assert_same_weights(tiny, loaded)
    assert loaded.prediction == "v"
    forced = load_sd_checkpoint(tmp_path / "old.safetensors", tokenizer=tiny.tokenizer, prediction="eps")
    assert forced.prediction == "eps"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: {**s, "conditioner.embedders.0.transformer.x": torch.zeros(1)}, "SDXL"),
        (lambda s: {**s, "cond_stage_model.model.token_embedding.weight": torch.zeros(1)}, "SD2"),
        (
            lambda s: {**s, "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3)},
            "inpainting",
        ),
        (lambda s: {k: v for k, v in s.items() if not k.startswith("model.")}, "no UNet"),
        (lambda s: {"lora_unet_x.lora_down.weight": torch.zeros(1)}, "a LoRA"),
        (lambda s: {k: v for k, v in s.items() if not k.startswith("first_stage_model.")}, "first_stage_model"),
        (
            lambda s: {k: v for k, v in s.items() if "output_blocks.2." not in k},
            "missing",
        ),
    ],
)
def test_wrong_checkpoints_are_named(state, tmp_path, edit, message):
    save_file(edit(dict(state)), str(tmp_path / "bad.safetensors"))
    with pytest.raises(SDCheckpointError, match=message):
        load_sd_checkpoint(tmp_path / "bad.safetensors", tokenizer=tmp_path)


def test_corrupt_files_and_pickled_code_are_refused(state, tmp_path):
    save_file(state, str(tmp_path / "m.safetensors"))
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SDCheckpointError, match="not a readable safetensors"):
        load_sd_checkpoint(tmp_path / "cut.safetensors")
    torch.save({"state_dict": state}, tmp_path / "m.ckpt")
    data = (tmp_path / "m.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(SDCheckpointError, match="truncated or not a torch"):
        load_sd_checkpoint(tmp_path / "cut.ckpt")
    torch.save({"state_dict": {"x": torch.zeros(1)}, "callback": torch.nn.Identity()}, tmp_path / "code.ckpt")
    with pytest.raises(SDCheckpointError, match="refused and not loaded"):
        load_sd_checkpoint(tmp_path / "code.ckpt")
    with pytest.raises(SDCheckpointError, match="does not exist"):
        load_sd_checkpoint(tmp_path / "absent.safetensors")


def test_tokenizer_from_clip_bpe_file(tmp_path):
    """CLIP's own vocabulary file: ids are byte symbols (256), the same with </w> (256), merges in rank order,
    then <|startoftext|>, <|endoftext|>; prompts are padded with <|endoftext|> to 77."""
    merges = ["r e", "re d</w>", "s h", "sh i", "shi r", "shir t</w>"]
    with gzip.open(tmp_path / "bpe_simple_vocab_16e6.txt.gz", "wt", encoding="utf-8") as f:
        f.write('"bpe_simple_vocab_16e6.txt#version: 0.2\n' + "\n".join(merges) + "\n")
    tokenizer = tokenizer_from_bpe(tmp_path / "bpe_simple_vocab_16e6.txt.gz")
    red, shirt = 512 + merges.index("re d</w>"), 512 + merges.index("shir t</w>")
    sot, eot = 512 + len(merges), 513 + len(merges)
    ids = tokenizer(["Red  shirt"], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert ids == [sot, red, shirt] + [eot] * 74


def test_tiny_model_encodes_prompts_and_images(tiny):
    context = tiny.encode_text(["a shirt", "a dress"])
    assert context.shape == (2, 77, 64) and not torch.equal(context[0], context[1])
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    mean = tiny.encode_images(pixels)
    assert mean.shape == (1, 4, 8, 8)
    a = tiny.encode_images(pixels, torch.Generator().manual_seed(3))
    assert torch.equal(a, tiny.encode_images(pixels, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, mean)
    assert tiny.decode_latents(mean).shape == (1, 3, 64, 64)


def test_tokenizer_is_found_on_disk_or_named_missing(tmp_path, monkeypatch):
    """Never downloaded: the Hugging Face cache (local files only), else CLIP's BPE file inside an installed
    `clip` package, else an error saying what to provide."""
    from transformers import CLIPTokenizer

    asked = []

    def not_cached(name, **kwargs):
        asked.append(kwargs.get("local_files_only"))
        raise OSError("not in the cache")

    monkeypatch.setattr(CLIPTokenizer, "from_pretrained", not_cached)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(SDCheckpointError, match="no CLIP tokenizer files were found"):
        find_clip_tokenizer()
    assert asked == [True]
    monkeypatch.undo()
    monkeypatch.setattr(CLIPTokenizer, "from_pretrained", not_cached)
    package = tmp_path / "clip"
    package.mkdir()
    (package / "__init__.py").write_text("")
    with gzip.open(package / "bpe_simple_vocab_16e6.txt.gz", "wt", encoding="utf-8") as f:
        f.write("header\ns h\nsh i\nshi r\nshir t</w>\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    tokenizer = find_clip_tokenizer()
    assert tokenizer("shirt").input_ids == [516, 515, 517]  # <|startoftext|>, shirt</w> (merge 4), <|endoftext|>
