"""`python -m lib_anydressing dress-batch`: dress a catalog from a manifest, resumable, locally or on Ray.

One JSON object per line (see lib_anydressing/batch/jobs.py and the README's Batch section). Each image is
written as OUT/<id>-<seed>.png with A1111-format parameters (drop it on the WebUI's PNG Info to reproduce its
settings) and one line in OUT/results.jsonl. Run the same command again to finish what an interrupted run
left; failed images are tried again. Exit status: 0 all done, 1 some jobs failed or were bad, 2 nothing ran.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..engine import CheckpointError
from ..generation.model_files import TRAINING_FREE
from ..sd.architectures import SDCheckpointError
from .control import ControlNetError
from .jobs import read_manifest, tasks_in_order
from .model import DEMO, ModelSpec
from .outputs import OutputFolder
from .runner import BatchRunner, Rendered
from .samplers import SAMPLERS, require_diffusers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", type=Path, required=True, help="JSONL file, one job per line")
    parser.add_argument("--checkpoint", default=DEMO, help="SD1.x .safetensors/.ckpt file, or 'demo' (built in)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNGs and results.jsonl")
    parser.add_argument(
        "--model", default=TRAINING_FREE, help="AnyDressing model: a name in models/anydressing or a path"
    )
    parser.add_argument("--sampler", default="DPM++ 2M Karras", choices=list(SAMPLERS), help="for jobs that name none")
    parser.add_argument("--batch-size", type=int, default=4, help="images per UNet call (same garments and size)")
    parser.add_argument("--device", default="", help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--tokenizer", default="", help="CLIP tokenizer folder (default: the environment's)")
    parser.add_argument("--controlnet", default="", help="ControlNet model file for jobs with a pose image (SD1.x)")
    ray_help = "run on Ray: alone, start a cluster on this machine; ADDRESS (or 'auto'): join that cluster"
    parser.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS", help=ray_help)
    parser.add_argument("--workers", type=int, default=0, help="Ray actors (default: one per GPU, else 1)")


def main(args: argparse.Namespace) -> int:
    try:
        jobs, bad = read_manifest(args.manifest, defaults={"sampler": args.sampler})
    except OSError as e:
        print(f"error: cannot read the manifest: {e}")
        return 2
    folder = OutputFolder(args.out)
    for item in bad:
        folder.report_bad(item)
        print(f"skipped line {item.line}: {item.reason}")
    done = folder.finished()
    tasks = [t for t in tasks_in_order(jobs) if t.key not in done]
    print(f"{len(jobs)} jobs, {len(done)} images already done, {len(tasks)} to render")
    spec = ModelSpec(args.checkpoint, args.model, args.device, tokenizer=args.tokenizer, controlnet=args.controlnet)
    counts = {"ok": 0, "failed": 0}
    progress = _progress(len(tasks))

    def on_result(rendered: Rendered) -> None:
        record = folder.write(rendered)
        counts[record["status"]] += 1
        if record["status"] != "ok":
            progress.write(f"{record['id']} seed {record['seed']}: {'; '.join(record['problems'])}")
        progress.update(1)

    start = time.perf_counter()
    try:
        require_diffusers()
        extractions = _render(spec, tasks, on_result, args)
    except (SDCheckpointError, CheckpointError, ControlNetError, FileNotFoundError, RuntimeError) as e:
        progress.close()
        print(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        progress.close()
        print(f"interrupted after {counts['ok']} images: run the same command again to render the rest")
        return 130
    progress.close()
    seconds = time.perf_counter() - start
    rate = counts["ok"] / seconds if seconds else 0.0
    print(f"{counts['ok']} images written, {counts['failed']} failed, {len(bad)} bad lines; "
          f"{extractions} garment feature passes; {rate:.3f} images/s; results: {folder.results}")  # fmt: skip
    return 0 if not counts["failed"] and not bad else 1


def _render(spec: ModelSpec, tasks: list, on_result, args: argparse.Namespace) -> int:
    if not tasks:
        return 0
    if args.ray is not None:
        from .ray_pool import run_on_ray

        return run_on_ray(spec, tasks, on_result, address=args.ray or None, workers=args.workers,
                          batch_size=args.batch_size)  # fmt: skip
    runner = BatchRunner(spec.load(), args.batch_size)
    for rendered in runner.run(tasks):
        on_result(rendered)
    return runner.extractions


def _progress(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", dynamic_ncols=True)
