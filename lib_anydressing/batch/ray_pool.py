"""Scale-out on Ray: one actor per GPU (or `workers` on a CPU cluster) holding the model, fed one garment set at
a time, so each set's features are computed once by the actor that renders it.

The driver keeps the queue and writes every image and results line itself, so a cluster needs no shared
folder. An actor lost mid-set (its node gone, killed, out of host memory) leaves that set to the next free
actor, up to `ATTEMPTS` times. Ray is optional: imported only here, only with `--ray`.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Callable
from itertools import groupby
from pathlib import Path
from typing import Any

from .jobs import Task
from .model import ModelSpec
from .runner import BatchRunner, Rendered, record

ATTEMPTS = 3
NO_RAY = "--ray needs the 'ray' package (pip install ray); without --ray the batch runs in this process"


class DressWorker:
    """The actor: a BatchRunner around the loaded model."""

    def __init__(self, spec: ModelSpec, batch_size: int, threads: int | None = None) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.runner = BatchRunner(spec.load(), batch_size)

    def run(self, tasks: list[Task]) -> tuple[list[Rendered], int]:
        """The set's images and how many GarmentsNet passes they took."""
        before = self.runner.extractions
        rendered = list(self.runner.run(tasks))
        return rendered, self.runner.extractions - before


def garment_sets(tasks: list[Task]) -> list[list[Task]]:
    """Consecutive tasks of one garment set (tasks_in_order puts them together)."""
    return [list(group) for _, group in groupby(tasks, key=lambda t: t.job.garment_set())]


def run_on_ray(
    spec: ModelSpec, tasks: list[Task], on_result: Callable[[Rendered], None], *, address: str | None = None,
    workers: int = 0, batch_size: int = 4, threads: int | None = None, worker: type = DressWorker,
) -> int:  # fmt: skip
    """Render `tasks` on a Ray cluster (`address`: join it; None: start one on this machine, or join the one
    `ray start` runs here). Returns the GarmentsNet passes run. `worker`: the actor class (DressWorker)."""
    try:
        import ray
    except ImportError:
        raise RuntimeError(NO_RAY) from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, runtime_env={"env_vars": {"PYTHONPATH": _python_path()}}, log_to_driver=False)
    try:
        actor_class = ray.remote(num_gpus=1 if ray.cluster_resources().get("GPU") else 0, num_cpus=1)(worker)
        return _schedule(ray, lambda: actor_class.remote(spec, batch_size, threads), garment_sets(tasks), on_result,
                         workers)  # fmt: skip
    finally:
        if started:
            ray.shutdown()


def _schedule(
    ray: Any, new_actor: Callable[[], Any], sets: list[list[Task]], on_result: Callable[[Rendered], None], workers: int
) -> int:
    count = max(1, workers or int(ray.cluster_resources().get("GPU", 0)) or 1)
    idle = [new_actor() for _ in range(min(count, max(len(sets), 1)))]
    queue = deque((tasks, 1) for tasks in sets)
    running: dict[Any, tuple[Any, list[Task], int]] = {}
    extractions = 0
    while queue or running:
        while idle and queue:
            actor = idle.pop()
            tasks, attempt = queue.popleft()
            running[actor.run.remote(tasks)] = (actor, tasks, attempt)
        [ref], _ = ray.wait(list(running), num_returns=1)
        actor, tasks, attempt = running.pop(ref)
        try:
            rendered, passes = ray.get(ref)
        except ray.exceptions.RayActorError as e:  # the actor is gone: its set goes back in the queue
            if attempt < ATTEMPTS:
                queue.append((tasks, attempt + 1))
            else:
                for task in tasks:
                    on_result(_lost(task, e))
            if not idle and not running:
                idle.append(new_actor())  # every actor lost: start another
            continue
        extractions += passes
        for item in rendered:
            on_result(item)
        idle.append(actor)
    return extractions


def _lost(task: Task, error: Exception) -> Rendered:
    reason = f"its worker was lost {ATTEMPTS} times ({type(error).__name__})"
    return Rendered(task.key, None, record(task, "failed", problems=[reason]))


def _python_path() -> str:
    """The workers import this package (and A1111's repositories/, added by __main__) from the same places as
    the driver: on a cluster, every node has the extension and its packages at the same paths."""
    root = str(Path(__file__).resolve().parents[2])
    extra = [p for p in sys.path if "repositories" in p]
    return os.pathsep.join([root, *extra, *filter(None, [os.environ.get("PYTHONPATH")])])
