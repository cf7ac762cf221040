"""Evaluation metrics against plain computations: a tiny real CLIPModel saved to a folder and loaded back."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizerFast
from transformers.models.clip.tokenization_clip import bytes_to_unicode

from lib_anydressing.evaluation import cli
from lib_anydressing.evaluation.aesthetic import AestheticLoadError, load_aesthetic_head
from lib_anydressing.evaluation.clip_models import ClipEncoder, ClipLoadError
from lib_anydressing.evaluation.metrics import score_sample

DIM = 16  # projection size of the tiny CLIP


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> tuple[Path, CLIPModel, CLIPProcessor]:
    """A random tiny CLIP (real transformers classes) and its processor, saved like a hub folder."""
    folder = tmp_path_factory.mktemp("clip")
    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate([*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")  # no merges: one token per character
    tokenizer = CLIPTokenizerFast(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = CLIPProcessor(image_processor=images, tokenizer=tokenizer)
    processor.save_pretrained(folder)
    text = {"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2}
    text |= {"num_attention_heads": 2, "max_position_embeddings": 77, "eos_token_id": len(vocab) - 1}
    vision = {"hidden_size": 32, "image_size": 32, "patch_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(text_config=text, vision_config={**vision, "intermediate_size": 37}, projection_dim=DIM)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model, processor


@pytest.fixture(scope="module")
def encoder(tiny_clip) -> ClipEncoder:
    return ClipEncoder.from_folder(tiny_clip[0])


def noise_image(seed: int, size: tuple[int, int] = (48, 64)) -> Image.Image:
    """(width, height) of smooth random colours, so CLIP's downscaling keeps differences."""
    small = np.random.default_rng(seed).integers(0, 256, (4, 3, 3), dtype=np.uint8)
    return Image.fromarray(small, "RGB").resize(size, Image.Resampling.BILINEAR)


def reference_image_embedding(model: CLIPModel, processor: CLIPProcessor, image: Image.Image) -> torch.Tensor:
    with torch.no_grad():
        pixels = processor(images=image, return_tensors="pt")["pixel_values"]
        return model.get_image_features(pixel_values=pixels)[0]


def padded_square(image: Image.Image) -> Image.Image:
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


def test_clip_t_is_the_plain_cosine_of_the_loaded_model(tiny_clip, encoder):
    _, model, processor = tiny_clip
    image, prompt = noise_image(1), "a person wearing a striped red shirt and blue trousers"
    scores = score_sample(image, prompt, [noise_image(2)], [None], encoder)
    with torch.no_grad():
        tokens = processor(text=[prompt], return_tensors="pt")
        text = model.get_text_features(**tokens)[0]
    expected = F.cosine_similarity(reference_image_embedding(model, processor, image), text, dim=0)
    assert scores.clip_t == pytest.approx(float(expected), abs=1e-5)
    assert scores.clip_i_star is None and scores.clip_as is None
    other = score_sample(image, "a green hat", [noise_image(2)], [None], encoder)
    assert other.clip_t != pytest.approx(scores.clip_t, abs=1e-4)  # the prompt matters


def test_clip_i_compares_the_image_with_each_garment(tiny_clip, encoder):
    _, model, processor = tiny_clip
    square = noise_image(3, (40, 40))
    assert score_sample(square, "x", [square], [None], encoder).clip_i == pytest.approx(1.0, abs=1e-5)
    image, garments = noise_image(4), [noise_image(5, (30, 50)), noise_image(6, (50, 20))]
    own = reference_image_embedding(model, processor, image)
    expected = np.mean(
        [
            float(F.cosine_similarity(own, reference_image_embedding(model, processor, padded_square(g)), dim=0))
            for g in garments
        ]
    )
    assert score_sample(image, "x", garments, [None, None], encoder).clip_i == pytest.approx(expected, abs=1e-5)


def test_clip_i_star_sees_only_the_masked_regions(tiny_clip, encoder):
    _, model, processor = tiny_clip
    image = np.asarray(noise_image(7, (48, 64))).copy()
    masks = [np.zeros((64, 48), dtype=bool), np.zeros((64, 48), dtype=bool)]
    masks[0][8:30, 10:40] = True
    masks[0][8:12, 10:20] = False  # not a box: the bounding box holds unmasked pixels
    masks[1][34:60, 12:36] = True
    garments = [noise_image(8, (30, 30)), noise_image(9, (24, 30))]
    base = score_sample(Image.fromarray(image), "x", garments, masks, encoder)

    # the plain computation: crop each mask's box, white outside the mask, pad square, cosine, mean
    expected = []
    for m, g in zip(masks, garments, strict=True):
        ys, xs = np.nonzero(m)
        crop = image[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].copy()
        crop[~m[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]] = 255
        a = reference_image_embedding(model, processor, padded_square(Image.fromarray(crop)))
        b = reference_image_embedding(model, processor, padded_square(g))
        expected.append(float(F.cosine_similarity(a, b, dim=0)))
    assert base.clip_i_star == pytest.approx(np.mean(expected), abs=1e-5)

    outside = image.copy()
    outside[~(masks[0] | masks[1])] = np.random.default_rng(0).integers(
        0, 256, (int((~(masks[0] | masks[1])).sum()), 3)
    )
    changed = score_sample(Image.fromarray(outside), "x", garments, masks, encoder)
    assert changed.clip_i_star == pytest.approx(base.clip_i_star, abs=1e-6)
    assert changed.clip_i != pytest.approx(base.clip_i, abs=1e-4)  # the whole-image metric does see it
    inside = image.copy()
    inside[masks[1]] = 255 - inside[masks[1]]
    assert score_sample(Image.fromarray(inside), "x", garments, masks, encoder).clip_i_star != pytest.approx(
        base.clip_i_star, abs=1e-4
    )


def reference_head(dim: int = DIM) -> nn.Sequential:
    """The published layer stack, written out here independently of the code under test."""
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
    ).eval()  # fmt: skip


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_aesthetic_head_loads_the_published_layout_and_normalises(tmp_path, suffix):
    mlp = reference_head()
    state = {f"layers.{k}": v for k, v in mlp.state_dict().items()}
    path = tmp_path / f"aesthetic{suffix}"
    torch.save(state, path) if suffix == ".pth" else save_file(state, str(path))
    head = load_aesthetic_head(path)
    embedding = torch.randn(2, DIM, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = mlp(embedding / embedding.norm(dim=-1, keepdim=True)).squeeze(-1)
    assert torch.allclose(head(embedding), expected, atol=1e-6)
    assert torch.allclose(head(embedding * 7.5), expected, atol=1e-6)  # the length does not matter
    assert torch.equal(head(embedding), head(embedding))  # eval mode: no dropout


def test_bad_model_files_are_refused_with_a_message(tmp_path, tiny_clip):
    torch.save({"layers.0.weight": torch.zeros(4, DIM), "layers.0.bias": torch.zeros(4)}, tmp_path / "small.pth")
    with pytest.raises(AestheticLoadError, match="another layer layout"):
        load_aesthetic_head(tmp_path / "small.pth")
    torch.save({"w": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(AestheticLoadError, match="not an improved-aesthetic-predictor"):
        load_aesthetic_head(tmp_path / "other.pth")
    with pytest.raises(ClipLoadError, match="config.json"):
        ClipEncoder.from_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    with pytest.raises(ClipLoadError, match="not a full CLIP"):  # an image encoder alone has no text side
        ClipEncoder.from_folder(tmp_path)
    (tmp_path / "config.json").write_text((tiny_clip[0] / "config.json").read_text())
    with pytest.raises(ClipLoadError, match="model.safetensors"):
        ClipEncoder.from_folder(tmp_path)
    save_file({"logit_scale": torch.ones(())}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ClipLoadError, match="missing"):
        ClipEncoder.from_folder(tmp_path)


@pytest.fixture
def cases(tmp_path) -> Path:
    """An evaluation folder: 3 cases (one without masks, one whose image is missing), two methods' outputs."""
    for name in ("garments", "masks", "method_a", "method_b"):
        (tmp_path / name).mkdir()
    lines = []
    for i in range(3):
        garments = []
        for k in range(2):
            noise_image(10 * i + k, (30, 40)).save(tmp_path / "garments" / f"{i}_{k}.png")
            mask = np.zeros((32, 24), dtype=np.uint8)  # half the generated size: scaled up
            mask[k * 16 : k * 16 + 14, 4:20] = 255
            Image.fromarray(mask).save(tmp_path / "masks" / f"{i}_{k}.png")
            garment = {"image": f"garments/{i}_{k}.png"}
            garments.append(garment if i == 1 else {**garment, "mask": f"masks/{i}_{k}.png"})
        lines.append(json.dumps({"id": f"c{i}", "prompt": f"case {i}", "garments": garments}))
        noise_image(100 + i).save(tmp_path / "method_a" / f"c{i}.png")
        if i != 2:
            noise_image(200 + i).save(tmp_path / "method_b" / f"c{i}.jpg")
    (tmp_path / "cases.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.main(parser.parse_args(list(argv)))


def test_eval_cli_table_and_json_match_the_metrics(cases, tiny_clip, encoder, tmp_path, capsys):
    mlp = reference_head()
    torch.save({f"layers.{k}": v for k, v in mlp.state_dict().items()}, cases / "aesthetic.pth")
    config = cases / "eval.toml"
    config.write_text(
        f'[eval]\nclip = "{tiny_clip[0]}"\naesthetic = "aesthetic.pth"\nmanifest = "cases.jsonl"\n'
        'images = ["method_a", "method_b"]\ndevice = "cpu"\nout = "results.json"\n'
    )
    assert run_cli("--config", str(config)) == 0
    text = capsys.readouterr().out
    assert "| images | samples | CLIP-T | CLIP-I | CLIP-AS | CLIP-I* |" in text
    assert "1 x missing file (e.g. c2)" in text
    data = json.loads((cases / "results.json").read_text())
    a, b = data["rows"]
    assert (a["samples"], a["samples_with_regions"], b["samples"], b["skipped"]) == (3, 2, 2, {"missing file": 1})

    # every number is the metric of that case, computed directly; the means are over what each case has
    per_case = {}
    for i in range(3):
        image = Image.open(cases / "method_a" / f"c{i}.png")
        garments = [Image.open(cases / "garments" / f"{i}_{k}.png") for k in range(2)]
        masks = [None, None]
        if i != 1:
            masks = [
                np.asarray(Image.open(cases / "masks" / f"{i}_{k}.png").resize((48, 64), Image.Resampling.NEAREST))
                > 127
                for k in range(2)
            ]
        per_case[f"c{i}"] = score_sample(image, f"case {i}", garments, masks, encoder)
    for sid, s in per_case.items():
        assert a["per_sample"][sid]["CLIP-T"] == pytest.approx(s.clip_t, abs=1e-6)
        assert a["per_sample"][sid]["CLIP-I"] == pytest.approx(s.clip_i, abs=1e-6)
        own = reference_image_embedding(tiny_clip[1], tiny_clip[2], Image.open(cases / "method_a" / f"{sid}.png"))
        with torch.no_grad():
            aesthetic = float(mlp(own / own.norm())[0])
        assert a["per_sample"][sid]["CLIP-AS"] == pytest.approx(aesthetic, abs=1e-5)
    assert a["CLIP-T"] == pytest.approx(np.mean([s.clip_t for s in per_case.values()]), abs=1e-6)
    assert a["CLIP-I*"] == pytest.approx(np.mean([per_case[c].clip_i_star for c in ("c0", "c2")]), abs=1e-6)
    assert a["per_sample"]["c1"]["CLIP-I*"] is None
    row = next(line for line in text.splitlines() if line.startswith(f"| {cases / 'method_a'} "))
    assert f"| {a['CLIP-T']:.3f} |".replace("0.", ".", 1) in row and f"| {a['CLIP-AS']:.3f} |" in row

    # flags override the config; --json prints the same numbers
    assert run_cli("--config", str(config), "--images", str(cases / "method_b"), "--json") == 0
    printed = json.loads(capsys.readouterr().out)
    assert [r["images"] for r in printed["rows"]] == [str(cases / "method_b")]
    assert printed["rows"][0]["per_sample"] == b["per_sample"]


def test_eval_cli_says_what_is_wrong(cases, tiny_clip, tmp_path, capsys):
    assert run_cli("--manifest", str(cases / "cases.jsonl")) == 2
    assert "no clip" in capsys.readouterr().out
    torch.save({f"layers.{k}": v for k, v in reference_head(768).state_dict().items()}, tmp_path / "l14.pth")
    args = (
        "--clip",
        str(tiny_clip[0]),
        "--manifest",
        str(cases / "cases.jsonl"),
        "--aesthetic",
        str(tmp_path / "l14.pth"),
    )
    assert run_cli(*args) == 2
    assert "768-d CLIP ViT-L/14" in capsys.readouterr().out
    (tmp_path / "bad.toml").write_text("clip = [")
    assert run_cli("--config", str(tmp_path / "bad.toml")) == 2
    assert "not valid TOML" in capsys.readouterr().out
