"""`python -m lib_anydressing bench-batch`: batch throughput on the built-in demo model, in this process and
through a local Ray cluster, same jobs, same run.

Six jobs over two garment sets (tests/data's garments). Both timings include loading the model (each Ray
actor loads its own, and imports torch and the rest in its fresh process); `ray_start_s` is the cluster's
start, apart. `feature_extractions` equal to
`garment_sets` shows features reused across a set's prompts and seeds. On one machine Ray adds processes,
not speed: its figure is what the scheduling costs, the gain comes with more GPUs or machines.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from ..files.bench_output import print_result
from .jobs import read_manifest, tasks_in_order
from .model import DEMO, ModelSpec
from .runner import BatchRunner, Rendered
from .samplers import build_scheduler

DATA = Path(__file__).resolve().parents[2] / "tests" / "data"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, default=128, help="image side (multiple of 64)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="Ray actors")
    parser.add_argument("--no-ray", action="store_true", help="only the in-process figure")
    parser.add_argument("--json", action="store_true")


def bench_manifest(folder: Path, size: int = 128, steps: int = 4) -> Path:
    """Six jobs, two garment sets (top + trousers held to halves; the top alone), three prompts each."""
    two = [
        {"image": str(DATA / "garment_top.png"), "category": "upper", "region": "box", "box": [0, 0, 1, 0.5]},
        {"image": str(DATA / "garment_trousers.png"), "category": "lower", "region": "box", "box": [0, 0.5, 1, 1]},
    ]
    sets = {"outfit": two, "top": two[:1]}
    lines = [
        {"id": f"{name}-{i}", "prompt": prompt, "garments": garments, "seed": i, "width": size, "height": size,
         "steps": steps}
        for name, garments in sets.items()
        for i, prompt in enumerate(["a woman, studio", "a man, street", "a person, beach"])
    ]  # fmt: skip
    path = folder / "jobs.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    return path


def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        jobs, _ = read_manifest(bench_manifest(Path(tmp), args.size, args.steps))
    tasks = tasks_in_order(jobs)
    spec = ModelSpec(DEMO, device="cpu")
    build_scheduler("DDIM", "eps")  # imports (diffusers, ldm) outside the timing: Ray's workers pay theirs apart
    import ldm.modules.diffusionmodules.openaimodel  # noqa: F401

    start = time.perf_counter()
    runner = BatchRunner(spec.load(), args.batch_size)
    local = [r for r in runner.run(tasks) if r.png is not None]
    seconds = time.perf_counter() - start
    result: dict[str, object] = {
        "images": len(local),
        "garment_sets": len({t.job.garment_set() for t in tasks}),
        "feature_extractions": runner.extractions,
        "images_per_s": round(len(local) / seconds, 4),
    }
    if not args.no_ray:
        result.update(_ray(spec, tasks, args))
    print_result(result, args.json)
    return 0


def _ray(spec: ModelSpec, tasks: list, args: argparse.Namespace) -> dict[str, object]:
    try:
        import ray
    except ImportError:
        return {"ray_images_per_s": None, "ray_note": "ray is not installed (pip install ray)"}
    from .ray_pool import run_on_ray

    start = time.perf_counter()
    ray.init(num_cpus=args.workers, log_to_driver=False)
    started = time.perf_counter() - start
    done: list[Rendered] = []
    try:
        start = time.perf_counter()
        passes = run_on_ray(spec, tasks, done.append, workers=args.workers, batch_size=args.batch_size, threads=1)
        seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
    return {
        "ray_images_per_s": round(sum(r.png is not None for r in done) / seconds, 4),
        "ray_feature_extractions": passes,
        "ray_workers": args.workers,
        "ray_start_s": round(started, 2),
    }
