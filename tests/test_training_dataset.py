"""The training dataset: the synthetic set loads with the trainer's contract; bad samples are skipped and counted."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from support.synthetic import make_synthetic_dataset

from lib_anydressing.files.manifest import DressingDataset

SIZE = (64, 48)  # (height, width) of the synthetic people
SLOTS = ("upper", "lower")


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    return make_synthetic_dataset(tmp_path / "data", n_samples=4, size=SIZE, seed=3)


def lines(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def write_lines(manifest: Path, rows: list[dict | str]) -> None:
    manifest.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


def test_synthetic_set_has_the_contract_shapes_and_ranges(manifest):
    ds = DressingDataset(manifest, size=SIZE, garment_size=(32, 32), slot_names=SLOTS)
    assert len(ds) == 4 and ds.report.skipped == 0
    row = lines(manifest)[1]
    s = ds[1]
    assert s["person"].shape == (3, *SIZE) and s["person"].dtype == torch.float32
    assert s["garments"].shape == (2, 3, 32, 32)
    assert s["masks"].shape == (2, *SIZE)
    for key in ("person", "garments"):
        assert s[key].min() >= -1 and s[key].max() <= 1
    assert set(s["masks"].unique().tolist()) == {0.0, 1.0}
    assert s["slots"].dtype == torch.long and s["slots"].tolist() == [0, 1]
    assert s["caption"] == row["caption"] and s["id"] == row["id"]
    # at the native size nothing is resampled: the pixels and masks are the files' own
    root = manifest.parent
    person = np.asarray(Image.open(root / row["person"]), dtype=np.float32) / 127.5 - 1
    assert torch.allclose(s["person"], torch.from_numpy(person).permute(2, 0, 1), atol=1e-6)
    for k, g in enumerate(row["garments"]):
        mask = np.asarray(Image.open(root / g["mask"])) > 127
        assert torch.equal(s["masks"][k].bool(), torch.from_numpy(mask))
    # GTL's edge map, once per sample: OpenCV's Canny (100, 200) of the 8-bit grey person photo
    grey = cv2.cvtColor(np.asarray(Image.open(root / row["person"]).convert("RGB")), cv2.COLOR_RGB2GRAY)
    edges = torch.from_numpy(cv2.Canny(grey, 100, 200) > 0).float()
    assert s["edges"].shape == SIZE and edges.sum() > 0 and torch.equal(s["edges"], edges)
    # garments are fitted keeping their aspect: a garment taller than wide leaves white columns at the sides
    flat = Image.open(root / row["garments"][1]["image"])
    assert flat.height > flat.width
    assert torch.all(s["garments"][1][:, :, 0] == 1) and torch.all(s["garments"][1][:, :, -1] == 1)
    assert not torch.all(s["garments"][1][:, :, 16] == 1)


def test_synthetic_set_is_deterministic_and_small(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", 3, SIZE, seed=7)
    b = make_synthetic_dataset(tmp_path / "b", 3, SIZE, seed=7)
    c = make_synthetic_dataset(tmp_path / "c", 3, SIZE, seed=8)
    files = sorted(p.relative_to(a.parent) for p in a.parent.rglob("*") if p.is_file())
    assert all((a.parent / f).read_bytes() == (b.parent / f).read_bytes() for f in files)
    assert any((a.parent / f).read_bytes() != (c.parent / f).read_bytes() for f in files)
    assert sum((a.parent / f).stat().st_size for f in files) < 3 * 8000


def test_person_is_resized_and_cropped_with_its_masks(manifest):
    ds = DressingDataset(manifest, size=(32, 32), garment_size=(16, 24), slot_names=SLOTS)
    s = ds[0]
    assert s["person"].shape == (3, 32, 32) and s["garments"].shape == (2, 3, 16, 24)
    # a 64x48 person covering 32x32 is scaled to 42.7x32 and its centre rows kept: the masks follow
    row = lines(manifest)[0]
    mask = Image.open(manifest.parent / row["garments"][0]["mask"]).resize((32, 43), Image.Resampling.BILINEAR)
    top = (43 - 32) // 2
    expected = np.asarray(mask, dtype=np.float32)[top : top + 32] / 255 >= 0.5
    agree = (s["masks"][0].bool() == torch.from_numpy(expected)).float().mean()
    assert agree > 0.95
    # the masked person pixels are the garment's colours, not the background's
    inside = s["person"][:, s["masks"][0].bool()].mean(1)
    outside = s["person"][:, (s["masks"].sum(0) == 0)].mean(1)
    assert (inside - outside).abs().max() > 0.2


def test_bad_samples_are_skipped_and_counted(manifest):
    root = manifest.parent
    rows = lines(manifest)
    # 0: its mask file is gone; 1: a mask of another size; 2: a person file that is not an image
    (root / rows[0]["garments"][1]["mask"]).unlink()
    Image.open(root / rows[1]["garments"][0]["mask"]).resize((20, 20)).save(root / rows[1]["garments"][0]["mask"])
    (root / rows[2]["person"]).write_bytes(b"not an image at all")
    # 3 stays good; plus: no garments, bad JSON, an unknown category, a 1x1 garment image
    Image.new("RGB", (1, 1), (9, 9, 9)).save(root / "tiny.png")
    extra = [
        {"id": "empty", "person": rows[3]["person"], "garments": []},
        "{not json",
        {**rows[3], "id": "hat", "garments": [{**rows[3]["garments"][0], "category": "hat"}]},
        {**rows[3], "id": "tiny", "garments": [{**rows[3]["garments"][0], "image": "tiny.png"}]},
    ]
    write_lines(manifest, [*rows, *extra])
    ds = DressingDataset(manifest, size=SIZE, slot_names=SLOTS)
    assert [s.id for s in ds.samples] == [rows[3]["id"]]
    assert ds.report.total == 8 and ds.report.skipped == 7
    assert ds.report.counts == {
        "missing file": 1,
        "mask size differs from the person image": 1,
        "corrupt image": 1,
        "no garments": 1,
        "manifest line is not JSON": 1,
        "category 'hat' is not a slot name": 1,
        "image smaller than 8 px": 1,
    }
    assert ds.report.examples["missing file"] == [rows[0]["id"]]
    assert "1 of 8 samples usable, 7 skipped" in ds.report.summary()
    assert ds[0]["id"] == rows[3]["id"]


def test_a_file_that_fails_only_when_decoded_is_replaced_by_the_next_sample(manifest):
    rows = lines(manifest)
    person = manifest.parent / rows[1]["person"]
    person.write_bytes(person.read_bytes()[:120])  # the header reads, the pixels do not
    ds = DressingDataset(manifest, size=SIZE, slot_names=SLOTS)
    assert len(ds) == 4 and ds.report.skipped == 0  # the header check cannot see it
    assert ds[1]["id"] == rows[2]["id"]
    assert ds.report.counts == {"corrupt image": 1} and ds.report.examples["corrupt image"] == [rows[1]["id"]]
    assert ds[1]["id"] == rows[2]["id"] and ds.report.skipped == 1  # known bad: not retried, not recounted
    assert [ds[i]["id"] for i in (0, 2, 3)] == [rows[0]["id"], rows[2]["id"], rows[3]["id"]]


def test_cmyk_16_bit_and_alpha_files_load_as_their_pixels(manifest):
    root = manifest.parent
    rows = lines(manifest)
    row = rows[0]
    original = DressingDataset(manifest, size=SIZE, slot_names=SLOTS)[0]
    # person as a CMYK TIFF, upper mask as 16-bit grayscale, lower garment as RGBA with a transparent border
    Image.open(root / row["person"]).convert("CMYK").save(root / "person_cmyk.tif")
    mask = np.asarray(Image.open(root / row["garments"][0]["mask"]), dtype=np.uint16) * 257
    Image.fromarray(mask.astype(np.int32), "I").convert("I;16").save(root / "mask16.png")
    flat = Image.open(root / row["garments"][1]["image"]).convert("RGBA")
    canvas = Image.new("RGBA", (flat.width + 10, flat.height + 10), (0, 0, 0, 0))
    canvas.paste(flat, (5, 5))
    canvas.save(root / "garment_rgba.png")
    row = {**row, "person": "person_cmyk.tif"}
    upper, lower = row["garments"]
    row["garments"] = [{**upper, "mask": "mask16.png"}, {**lower, "image": "garment_rgba.png"}]
    write_lines(manifest, [row])
    s = DressingDataset(manifest, size=SIZE, slot_names=SLOTS)[0]
    assert (s["person"] - original["person"]).abs().max() < 2 / 255 + 1e-6  # CMYK round trip: within a level
    assert torch.equal(s["masks"], original["masks"])
    # the transparent border became white: the garment is the same picture with a white margin
    g = s["garments"][1]
    assert g.shape == original["garments"][1].shape and torch.all(g[:, 0, :] == 1)


def test_a_manifest_with_nothing_usable_says_why(tmp_path):
    manifest = tmp_path / "m.jsonl"
    write_lines(manifest, [{"id": "x", "person": "nope.png", "garments": [{"image": "a", "mask": "b"}]}])
    with pytest.raises(ValueError, match="missing file"):
        DressingDataset(manifest, slot_names=(*SLOTS, "other"))
