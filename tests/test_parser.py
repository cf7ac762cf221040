"""The clothes parser: a real SegformerForSemanticSegmentation folder written by the test, loaded through our
loader (safetensors, or a .bin read with weights_only), its labels mapped onto body parts, parses cached."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from support.parsers import ATR_LABELS, parser_model, write_parser

from lib_anydressing.segment.parser import PART_INDEX, GarmentParser, ParserError, ParserStore, find_parsers, part_of


def _photo(w=50, h=70):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_atr_and_lip_labels_map_onto_parts():
    atr = [part_of(name) for name in ATR_LABELS]
    assert atr == ["background", "hat", "hair", "face", "upper", "lower", "lower", "dress", "belt", "shoes",
                   "shoes", "face", "legs", "legs", "arms", "arms", "bag", "scarf"]  # fmt: skip
    lip = ["UpperClothes", "Coat", "Jumpsuits", "Socks", "Glove", "Torso-skin", "Left-arm", "Right-shoe"]
    assert [part_of(n) for n in lip] == ["upper", "upper", "dress", "shoes", "arms", "other", "arms", "shoes"]


@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "bin_weights_only"])
def test_loaded_parser_gives_the_models_own_labels(tmp_path, safetensors):
    folder = write_parser(tmp_path / "tiny_clothes", safetensors=safetensors)
    parser = GarmentParser(folder)
    photo = _photo()
    labels = parser.labels_of(photo)
    # the reference: the same random model, run the way transformers documents it (processor, logits, upsample)
    from transformers import SegformerImageProcessor

    model = parser_model()
    pixels = SegformerImageProcessor(size={"height": 64, "width": 64})(images=photo, return_tensors="pt")
    with torch.no_grad():
        logits = model(**pixels).logits
    want = F.interpolate(logits, size=(70, 50), mode="bilinear", align_corners=False)[0].argmax(0).numpy()
    assert labels.shape == (70, 50) and np.array_equal(labels, want)
    assert len(np.unique(labels)) > 1  # random biases: several classes, so the map is not trivially uniform
    parts = parser.parts(photo)
    assert parts.dtype == np.uint8
    assert np.array_equal(parts, np.vectorize(lambda i: PART_INDEX[part_of(ATR_LABELS[i])])(labels))


def test_same_photo_parsed_once(tmp_path):
    parser = GarmentParser(write_parser(tmp_path / "p"))
    calls = []
    parser.model.register_forward_hook(lambda *a: calls.append(1))
    photo = _photo()
    first = parser.parts(photo)
    again = parser.parts(photo.copy())
    assert len(calls) == 1 and again is first
    parser.parts(_photo(50, 71))
    assert len(calls) == 2


def test_pickle_with_code_is_refused_not_run(tmp_path):
    folder = write_parser(tmp_path / "p", safetensors=False)
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)

    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({**state, "extra": Payload()}, folder / "pytorch_model.bin", pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(ParserError, match="refused"):
        GarmentParser(folder)


def test_folders_that_are_not_parsers_are_named(tmp_path):
    with pytest.raises(ParserError, match="no config.json"):
        GarmentParser(tmp_path)
    vit = tmp_path / "vit"
    vit.mkdir()
    (vit / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ParserError, match="'vit' is not a segformer clothes parser \\(its config says 'vit'\\)"):
        GarmentParser(vit)
    ade = write_parser(tmp_path / "ade", labels=("wall", "building", "sky", "floor"))
    with pytest.raises(ParserError, match="labels no garments"):
        GarmentParser(ade)
    wrong = write_parser(tmp_path / "wrong")
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "hidden_sizes": [8, 16, 32, 128]}))
    with pytest.raises(ParserError, match="does not fit the SegformerForSemanticSegmentation"):
        GarmentParser(wrong)


def test_found_in_models_dirs_and_hf_cache(tmp_path, monkeypatch):
    write_parser(tmp_path / "models" / "parser" / "b2_clothes")
    (tmp_path / "models" / "parser" / "notes").mkdir()
    snapshot = tmp_path / "hf" / "hub" / "models--someone--segformer_clothes" / "snapshots" / "abc"
    write_parser(snapshot)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    found = find_parsers([tmp_path / "models" / "parser", tmp_path / "missing"])
    assert found == {"b2_clothes": tmp_path / "models" / "parser" / "b2_clothes", "someone/segformer_clothes": snapshot}
    store = ParserStore()
    assert store.get([tmp_path / "models" / "parser"]).folder.name == "b2_clothes"
    assert store.get([], "someone/segformer_clothes").folder == snapshot
    with pytest.raises(ParserError, match="'other' is not installed; installed: b2_clothes"):
        store.get([tmp_path / "models" / "parser"], "other")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    with pytest.raises(ParserError, match="no clothes parser is installed: put a segformer"):
        store.get([tmp_path / "missing"])


def test_bench_parse_times_a_parse_and_the_cache(tmp_path, capsys):
    from lib_anydressing.__main__ import main

    folder = write_parser(tmp_path / "p")
    assert main(["bench-parse", "--parser", str(folder), "--photos", "2", "--repeats", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["image_wh"] == [768, 1024] and result["parser"] == str(folder)
    assert result["cached_parse_ms"] < result["parse_ms"]  # the cache answers without the model


def test_huge_photo_labels_scaled_up_from_a_capped_map(tmp_path, monkeypatch):
    import lib_anydressing.segment.parser as parser_module

    parser = GarmentParser(write_parser(tmp_path / "p"))
    photo = _photo(60, 90)
    monkeypatch.setattr(parser_module, "MAX_SIDE", 30)  # a 60x90 photo is "huge" at this cap
    labels = parser.labels_of(photo)
    assert labels.shape == (90, 60)
    from transformers import SegformerImageProcessor

    pixels = SegformerImageProcessor(size={"height": 64, "width": 64})(images=photo, return_tensors="pt")
    with torch.no_grad():
        logits = parser_model()(**pixels).logits
    small = F.interpolate(logits, size=(30, 20), mode="bilinear", align_corners=False)[0].argmax(0).numpy()
    want = np.asarray(Image.fromarray(small.astype(np.uint8)).resize((60, 90), Image.Resampling.NEAREST))
    assert np.array_equal(labels, want)
