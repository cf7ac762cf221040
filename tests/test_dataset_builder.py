"""build-dataset: a folder of photos and garments -> a manifest the training dataset reads, skips reported."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support.synthetic import make_synthetic_dataset

from lib_anydressing.anydressing_trainer import builder
from lib_anydressing.files.manifest import DressingDataset
from lib_anydressing.segment.segmenter import GRABCUT, Segmenter

SIZE = (128, 96)
SLOTS = ("upper", "lower")


@pytest.fixture
def photos(tmp_path: Path) -> tuple[Path, list[dict]]:
    """A builder input folder made from synthetic samples, one per way of getting (or missing) a mask."""
    manifest = make_synthetic_dataset(tmp_path / "synthetic", n_samples=6, size=SIZE, seed=1)
    root = manifest.parent
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    src = tmp_path / "photos"
    src.mkdir()

    def put(row: dict, sid: str, masks: tuple[str, ...] = SLOTS) -> None:
        shutil.copy(root / row["person"], src / f"{sid}.png")
        for g in row["garments"]:
            shutil.copy(root / g["image"], src / f"{sid}_{g['category']}.png")
            if g["category"] in masks:
                shutil.copy(root / g["mask"], src / f"{sid}_{g['category']}_mask.png")

    put(rows[0], "a_files")  # both masks as files, plus a caption
    (src / "a_files.txt").write_text("  a caption from a file \n")
    # upper: a cutout placed on the photo's canvas (its alpha is the mask); lower: a box for the segmenter
    put(rows[1], "b_cutout_and_box", masks=())
    person = Image.open(root / rows[1]["person"]).convert("RGBA")
    person.putalpha(Image.open(root / rows[1]["garments"][0]["mask"]))
    person.save(src / "b_cutout_and_box_upper.png")
    lower = np.asarray(Image.open(root / rows[1]["garments"][1]["mask"])) > 0
    ys, xs = np.nonzero(lower)
    box = [int(xs.min()) - 2, int(ys.min()) - 2, int(xs.max()) + 3, int(ys.max()) + 3]
    (src / "b_cutout_and_box_lower.json").write_text(json.dumps({"box": box}))
    put(rows[2], "c_missing", masks=("upper",))  # skipped: nothing says where the lower garment is
    put(rows[3], "d_small_mask")
    Image.open(src / "d_small_mask_lower_mask.png").resize((48, 64)).save(src / "d_small_mask_lower_mask.png")
    put(rows[4], "e_corrupt")
    (src / "e_corrupt.png").write_bytes(b"\x89PNG broken")
    shutil.copy(root / rows[5]["garments"][0]["image"], src / "f_orphan_upper.png")  # no person photo
    (src / "notes.md").write_text("ignored")
    return src, rows


def test_builder_writes_what_the_dataset_reads_and_reports_skips(photos, tmp_path):
    src, rows = photos
    out = tmp_path / "dataset"
    result = builder.build_dataset(src, out, SLOTS)
    assert result.written == ["a_files", "b_cutout_and_box"]
    assert result.report.total == 6
    assert dict(result.report.counts) == {
        "no mask for 'lower' (no mask file, no cutout on the photo's canvas, no prompt JSON)": 1,
        "mask size differs from the person image": 1,
        "corrupt image": 1,
        "no person photo": 1,
    }
    assert result.mask_sources == {"mask file": 2, "garment alpha": 1, GRABCUT: 1}
    assert "2 of 6 samples usable, 4 skipped" in result.summary()
    # nothing of a skipped sample is written
    assert sorted(p.name for p in (out / "person").iterdir()) == ["a_files.png", "b_cutout_and_box.png"]

    ds = DressingDataset(result.manifest, size=SIZE, slot_names=SLOTS)
    assert len(ds) == 2 and ds.report.skipped == 0
    a, b = ds[0], ds[1]
    assert a["caption"] == "a caption from a file" and b["caption"] == ""
    assert a["slots"].tolist() == [1, 0]  # garments in file-name order: lower, upper
    synthetic = tmp_path / "synthetic"
    for sample, row in ((a, rows[0]), (b, rows[1])):
        order = [SLOTS[i] for i in sample["slots"].tolist()]
        truth = {g["category"]: np.asarray(Image.open(synthetic / g["mask"])) > 0 for g in row["garments"]}
        person = np.asarray(Image.open(synthetic / row["person"]), dtype=np.float32) / 127.5 - 1
        assert torch.equal(sample["person"], torch.from_numpy(person).permute(2, 0, 1))  # copied, not re-encoded
        for k, cat in enumerate(order):
            got = sample["masks"][k].numpy() > 0
            if sample is b and cat == "lower":  # GrabCut from a box: close to the truth, not exact
                assert (got & truth[cat]).sum() / (got | truth[cat]).sum() > 0.7
            else:  # mask files and the cutout's alpha are exact
                assert np.array_equal(got, truth[cat])
    lines = [json.loads(line) for line in result.manifest.read_text().splitlines()]
    assert {g["mask_source"] for g in lines[1]["garments"]} == {"garment alpha", GRABCUT}


def test_sam_checkpoint_makes_the_prompted_masks(photos, tmp_path):
    from segment_anything.build_sam import _build_sam

    torch.manual_seed(0)
    path = tmp_path / "tiny_sam.pth"
    torch.save(_build_sam(32, 2, 1, [1]).state_dict(), path)  # the real SAM classes, tiny and random
    src, _ = photos
    segmenter = Segmenter()
    segmenter.load(path)
    result = builder.build_dataset(src, tmp_path / "out", SLOTS, segmenter)
    assert result.mask_sources == {"mask file": 2, "garment alpha": 1, segmenter.engine: 1}
    assert segmenter.engine.startswith("SAM")
    # the written mask is what SAM answers for the box in the prompt JSON
    box = json.loads((src / "b_cutout_and_box_lower.json").read_text())["box"]
    photo = np.asarray(Image.open(src / "b_cutout_and_box.png").convert("RGB"))
    expected = segmenter.segment(photo, box=tuple(box)).mask
    written = np.asarray(Image.open(tmp_path / "out" / "masks" / "b_cutout_and_box_lower.png")) > 0
    assert expected.any() and np.array_equal(written, expected)


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    builder.add_arguments(parser)
    return builder.main(parser.parse_args(list(argv)))


def test_cli_reports_and_refuses_to_overwrite(photos, tmp_path, capsys):
    src, _ = photos
    out = tmp_path / "cli_out"
    assert run_cli("--in", str(src), "--out", str(out), "--categories", "upper,lower") == 0
    text = capsys.readouterr().out
    assert (
        GRABCUT in text and "2 of 6 samples usable, 4 skipped" in text and "1 x corrupt image (e.g. e_corrupt)" in text
    )
    assert run_cli("--in", str(src), "--out", str(out)) == 2
    assert "--overwrite" in capsys.readouterr().out
    assert run_cli("--in", str(src), "--out", str(out), "--overwrite", "--sam", str(tmp_path / "none.pth")) == 2
    assert "none.pth" in capsys.readouterr().out
    assert run_cli("--in", str(tmp_path / "missing"), "--out", str(out)) == 2
