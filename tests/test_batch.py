"""dress-batch: a manifest rendered from a real single-file checkpoint (tiny, written here), features reused per
garment set, A1111-readable parameters, resume, bad jobs, and the same images through a local Ray cluster."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from support.checkpoints import write_tiny_checkpoint

from lib_anydressing.__main__ import main as cli
from lib_anydressing.batch import outputs
from lib_anydressing.batch.jobs import read_manifest, tasks_in_order
from lib_anydressing.batch.model import ModelSpec
from lib_anydressing.batch.ray_pool import DressWorker
from lib_anydressing.batch.runner import BatchRunner
from lib_anydressing.generation.infotext import pasted

DATA = Path(__file__).parent / "data"
TOP = {"image": str(DATA / "garment_top.png"), "category": "upper", "region": "box", "box": [0, 0, 1, 0.5]}
TROUSERS = {"image": str(DATA / "garment_trousers.png"), "category": "lower", "region": "box", "box": [0, 0.5, 1, 1]}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny SD1.x model saved in the original single-file layout, with its tokenizer's files."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "tinysd.safetensors")


@pytest.fixture(scope="module")
def spec(checkpoint):
    path, tokenizer = checkpoint
    return ModelSpec(str(path), device="cpu", tokenizer=str(tokenizer))


def _manifest(folder: Path, lines: list[object]) -> Path:
    path = folder / "jobs.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return path


def _six_jobs(size: int = 128) -> list[dict]:
    """Two garment sets, three jobs each, interleaved in the file (the batch must regroup them)."""
    common = {"width": size, "height": size, "steps": 3, "negative_prompt": "blurry"}
    outfit = {"garments": [TOP, TROUSERS], "dressing": {"strength": 0.8}}
    top = {"garments": [TOP]}
    return [
        {"id": f"{name}{i}", "prompt": f"a person {i}", "seed": 10 + i, **common, **garments}
        for i in range(3)
        for name, garments in (("outfit", outfit), ("top", top))
    ]


def _run(manifest: Path, out: Path, spec: ModelSpec, *extra: str) -> int:
    return cli(["dress-batch", "--manifest", str(manifest), "--out", str(out), "--checkpoint", spec.checkpoint,
                "--tokenizer", spec.tokenizer, "--device", "cpu", *extra])  # fmt: skip


def _results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_six_jobs_over_two_garment_sets_run_garments_net_twice(spec, tmp_path):
    jobs, bad = read_manifest(_manifest(tmp_path, _six_jobs()))
    assert not bad and len(jobs) == 6
    runner = BatchRunner(spec.load(), batch_size=2)
    calls = []
    extract = runner.garments_net.extract
    runner.garments_net.extract = lambda *a, **k: calls.append(a[0].shape[0]) or extract(*a, **k)
    unet = runner.model.sd.unet
    probe = (torch.randn(2, 4, 16, 16), torch.tensor([500.0, 20.0]), torch.randn(2, 77, 64))
    before = ({k: v.clone() for k, v in unet.state_dict().items()}, unet(*probe))
    rendered = list(runner.run(tasks_in_order(jobs)))
    assert [r.record["status"] for r in rendered] == ["ok"] * 6
    assert calls == [2, 1]  # one pass per set (2 garments, then 1), not one per job or per UNet batch
    assert [r.key.rstrip("0123456789-") for r in rendered] == ["outfit"] * 3 + ["top"] * 3
    after = unet.state_dict()
    assert all(torch.equal(before[0][k], after[k]) for k in before[0])  # the model is left as it was
    assert torch.equal(unet(*probe), before[1])  # and computes as it did: nothing left patched or hooked


def test_an_image_does_not_depend_on_its_batch_and_repeats_exactly(spec, tmp_path):
    jobs, _ = read_manifest(_manifest(tmp_path, _six_jobs()))
    tasks = tasks_in_order(jobs)
    model = spec.load()
    batched = {r.key: r.png for r in BatchRunner(model, batch_size=3).run(tasks)}
    alone = {r.key: r.png for r in BatchRunner(model, batch_size=1).run(tasks[:1])}
    again = {r.key: r.png for r in BatchRunner(model, batch_size=3).run(tasks)}
    assert again == batched  # the same request gives the same image
    key = tasks[0].key
    a, b = (torch.tensor(list(Image.open(io.BytesIO(p)).getdata())) for p in (batched[key], alone[key]))
    assert (a - b).abs().max() <= 2  # the same noise alone or in a batch: only float rounding differs
    others = [k for k in batched if k != key]
    assert all(batched[k] != batched[key] for k in others)  # the seeds and prompts do change images


def _a1111_parse(text: str) -> dict[str, str]:
    """A1111 1.10.1 (82a973c0) modules/infotext_utils.py parse_generation_parameters, restated: the last line
    holds the entries when re_param finds at least 3 there; quoted values are JSON-unquoted; a WxH value
    becomes KEY-1 and KEY-2; the lines before are the prompt, then the negative prompt."""
    re_param = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
    *lines, last = text.strip().split("\n")
    if len(re_param.findall(last)) < 3:
        lines.append(last)
        last = ""
    res: dict[str, str] = {}
    prompt, negative, done = "", "", False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done, line = True, line[16:].strip()
        if done:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    for k, v in re_param.findall(last):
        if v[0] == '"' and v[-1] == '"':
            v = json.loads(v)
        size = re.match(r"^(\d+)x(\d+)$", v)
        if size:
            res[f"{k}-1"], res[f"{k}-2"] = size.group(1), size.group(2)
        else:
            res[k] = v
    return {**res, "Prompt": prompt, "Negative prompt": negative}


def test_png_parameters_read_back_as_a1111_reads_them(spec, tmp_path):
    job = {**_six_jobs(192)[0], "prompt": "a woman: red, smiling\nfull body", "sampler": "Euler a", "cfg_scale": 5.5,
           "dressing": {"strength": 0.8, "garment_guidance": 2.5, "end": 0.9}}  # fmt: skip
    assert _run(_manifest(tmp_path, [job]), tmp_path / "out", spec) == 0
    image = Image.open(tmp_path / "out" / "outfit0-10.png")
    assert image.size == (192, 192)
    params = _a1111_parse(image.info["parameters"])
    sha = hashlib.sha256(Path(spec.checkpoint).read_bytes()).hexdigest()
    assert params["Prompt"] == "a woman: red, smiling\nfull body" and params["Negative prompt"] == "blurry"
    assert (params["Steps"], params["Sampler"], params["Schedule type"], params["CFG scale"]) == (
        "3", "Euler a", "Automatic", "5.5")  # fmt: skip
    assert (params["Seed"], params["Size-1"], params["Size-2"], params["RNG"]) == ("10", "192", "192", "CPU")
    assert (params["Model hash"], params["Model"]) == (sha[:10], "tinysd")
    dressing = pasted(params, n_slots=4)  # what the accordion sets when this image is pasted into the WebUI
    assert dressing["enabled"] and dressing["strength"] == 0.8 and dressing["garment_guidance"] == 2.5
    assert (dressing["slot0_category"], dressing["slot1_category"]) == ("upper", "lower")
    assert (dressing["slot1_region"], dressing["slot1_box_y0"]) == ("box", 0.5)


def test_resume_after_an_interrupt_finishes_the_rest_only(spec, tmp_path, monkeypatch):
    manifest, out = _manifest(tmp_path, _six_jobs()), tmp_path / "out"
    write = outputs.OutputFolder.write
    seen = []

    def killed_on_the_third(self, rendered):
        seen.append(rendered.key)
        if len(seen) == 3:  # killed after the bytes, before the rename: a .part file is left behind
            (self.folder / f"{rendered.key}.png.part").write_bytes(rendered.png[:100])
            raise KeyboardInterrupt
        return write(self, rendered)

    monkeypatch.setattr(outputs.OutputFolder, "write", killed_on_the_third)
    assert _run(manifest, out, spec, "--batch-size", "1") == 130
    first = sorted(p.name for p in out.glob("*.png"))
    assert len(first) == 2 and list(out.glob("*.part"))
    stamps = {name: (out / name).stat().st_mtime_ns for name in first}
    monkeypatch.setattr(outputs.OutputFolder, "write", write)
    assert _run(manifest, out, spec) == 0
    assert len(list(out.glob("*.png"))) == 6 and not list(out.glob("*.part"))
    assert all((out / name).stat().st_mtime_ns == stamp for name, stamp in stamps.items())  # not rendered again
    records = _results(out)
    assert len(records) == 6 and {f"{r['id']}-{r['seed']}.png" for r in records} == {p.name for p in out.glob("*.png")}
    assert _run(manifest, out, spec) == 0 and len(_results(out)) == 6  # all done: nothing rendered, nothing added


def test_bad_jobs_are_reported_and_the_rest_still_run(spec, tmp_path):
    good = _six_jobs()[:2]
    missing = {**good[0], "id": "missing", "garments": [{"image": "nowhere/top.png", "category": "upper"}]}
    bad_category = {**good[0], "id": "cat", "garments": [{**TOP, "category": "cape"}]}
    lines = [good[0], "{not json", missing, {**good[1], "id": "wide", "width": 100}, bad_category,
             {**good[1], "colour": "red"}, good[1]]  # fmt: skip
    out = tmp_path / "out"
    assert _run(_manifest(tmp_path, lines), out, spec) == 1
    by_id = {r["id"]: r for r in _results(out)}
    assert by_id["outfit0"]["status"] == by_id["top0"]["status"] == "ok"
    assert by_id["line2"]["status"] == "bad" and "not a JSON object" in by_id["line2"]["problems"][0]
    assert by_id["missing"]["status"] == "failed"
    assert by_id["missing"]["problems"][0].startswith("garment 1 image: no file ") and "nowhere" in str(by_id)
    assert "width: must be a multiple of 64" in by_id["line4"]["problems"][0]
    assert by_id["cat"]["status"] == "failed" and "garment 1: category 'cape' is not one of" in str(by_id["cat"])
    assert "colour: unknown setting" in by_id["line6"]["problems"][0]
    assert sorted(p.name for p in out.glob("*.png")) == ["outfit0-10.png", "top0-10.png"]


def test_bench_batch_counts_one_feature_pass_per_set(capsys):
    assert cli(["bench-batch", "--no-ray", "--json", "--steps", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["images"] == 6 and result["garment_sets"] == result["feature_extractions"] == 2
    assert result["images_per_s"] > 0


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def local_images(spec, tmp_path_factory):
    """The six jobs' images rendered in this process, on one thread as each Ray actor runs."""
    jobs, _ = read_manifest(_manifest(tmp_path_factory.mktemp("jobs"), _six_jobs()))
    tasks = tasks_in_order(jobs)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float sums as the actors'
    try:
        return tasks, {r.key: r.png for r in BatchRunner(spec.load(), batch_size=2).run(tasks)}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_a_local_ray_cluster_gives_the_same_images(spec, local_ray, local_images):
    from lib_anydressing.batch.ray_pool import run_on_ray

    tasks, local = local_images
    remote = []
    passes = run_on_ray(spec, tasks, remote.append, workers=2, batch_size=2, threads=1)
    assert passes == 2  # each set's features once, on whichever actor rendered it
    assert {r.key: r.png for r in remote} == local


class DiesOnce(DressWorker):
    """An actor whose process ends in the middle of its first set (a node lost, an OOM kill)."""

    marker = ""  # a file: the first actor to run writes it and dies

    def run(self, tasks):
        if not Path(self.marker).exists():
            Path(self.marker).write_text(tasks[0].key)
            os._exit(1)
        return super().run(tasks)


@pytest.mark.slow
def test_a_lost_actor_leaves_its_set_to_another(spec, local_ray, local_images, tmp_path):
    from lib_anydressing.batch.ray_pool import run_on_ray

    local_ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors cannot import this file
    tasks, local = local_images
    marker = tmp_path / "died"
    DiesOnce.marker = str(marker)
    remote = []
    run_on_ray(spec, tasks, remote.append, workers=2, batch_size=2, threads=1, worker=DiesOnce)
    assert marker.exists()  # an actor did die mid-set
    assert [r.record["status"] for r in remote] == ["ok"] * 6
    assert {r.key: r.png for r in remote} == local


def test_the_readme_example_manifest_reads_without_problems():
    jobs, bad = read_manifest(Path(__file__).parents[1] / "docs" / "batch-example.jsonl")
    assert not bad and len(jobs) == 3 and sum(len(j.seeds) for j in jobs) == 4
    assert all(Path(g["image"]).is_file() for j in jobs for g in j.garments)
    assert len({j.garment_set() for j in jobs}) == 2


@pytest.mark.slow
def test_a_killed_run_leaves_whole_images_and_resumes(spec, tmp_path):
    """A real SIGKILL of the command mid-batch: every PNG left under its name is whole; the re-run renders the rest."""
    import signal
    import subprocess
    import time

    jobs = [{**job, "steps": 25, "width": 192, "height": 192} for job in _six_jobs()]
    manifest, out = _manifest(tmp_path, jobs), tmp_path / "out"
    files = ["--manifest", str(manifest), "--out", str(out), "--checkpoint", spec.checkpoint]
    command = [sys.executable, "-m", "lib_anydressing", "dress-batch", *files, "--tokenizer", spec.tokenizer,
               "--device", "cpu", "--batch-size", "1"]  # fmt: skip
    log = open(tmp_path / "log.txt", "wb")  # noqa: SIM115  (a pipe could fill up and stall the command)
    process = subprocess.Popen(command, cwd=Path(__file__).parents[1], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if (out / "results.jsonl").is_file() and (out / "results.jsonl").read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    log.close()
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert 2 <= len(finished) < 6, (tmp_path / "log.txt").read_text()[-2000:]
    for name in finished:
        Image.open(out / name).load()  # whole files only: a partial one would fail to decode
    assert _run(manifest, out, spec, "--batch-size", "1") == 0
    assert len(list(out.glob("*.png"))) == 6 and not list(out.glob("*.part"))
    assert all((out / name).stat().st_mtime_ns == stamp for name, stamp in finished.items())
