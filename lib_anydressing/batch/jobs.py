"""The batch manifest: one JSON object per line, each a dressing job, read and checked before anything runs.

    {"id": "look01-studio", "prompt": "a woman in a studio, full body", "negative_prompt": "blurry",
     "garments": [{"image": "garments/top.png", "category": "upper", "region": "box", "box": [0, 0, 1, 0.55]},
                  {"image": "garments/skirt.png", "category": "lower", "weight": 0.9}],
     "seeds": [1, 2, 3], "width": 512, "height": 768, "steps": 25, "cfg_scale": 7, "sampler": "DPM++ 2M Karras",
     "dressing": {"strength": 1.0, "garment_guidance": 2.5}}

Paths are relative to the manifest's folder. `seed` (one number) or `seeds` (a list): one image per seed.
`pose` (with `pose_weight`, default 1): a pose image, e.g. an OpenPose skeleton, for the --controlnet model.
`dressing` takes the accordion's general options (see generation/options.py DressingArgs, `model` excepted:
the batch has one). A job without `id` is named by a hash of its content, so editing a job makes it a new one
and resuming never mixes the two. Blank lines and lines starting with `#` are skipped. A line that cannot be
used becomes a `BadJob` with the reason; the others still run.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files.settings_model import Field, Settings, ValidationError, problems_of, validator
from ..generation.options import GENERAL_FIELDS
from .samplers import SAMPLERS

DRESSING_FIELDS = tuple(name for name in GENERAL_FIELDS if name not in ("enabled", "model"))


class Job(Settings):
    id: str = ""
    prompt: str = ""
    negative_prompt: str = ""
    garments: list[dict[str, Any]] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=lambda: [0])
    width: int = 512
    height: int = 512
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = "DPM++ 2M Karras"
    dressing: dict[str, Any] = Field(default_factory=dict)
    pose: str = ""  # a pose (control) image for the batch's --controlnet model, used as it is (no preprocessor)
    pose_weight: float = 1.0
    line: int = 0  # where it came from, for messages

    @validator("width", "height")
    def _size(cls, v: int) -> int:
        if not 64 <= v <= 4096 or v % 64:
            raise ValueError("must be a multiple of 64 between 64 and 4096")
        return v

    @validator("steps")
    def _steps(cls, v: int) -> int:
        if not 1 <= v <= 150:
            raise ValueError("must be between 1 and 150")
        return v

    @validator("pose_weight")
    def _pose_weight(cls, v: float) -> float:
        if not 0 <= v <= 2:
            raise ValueError("must be between 0 and 2")
        return v

    @validator("sampler")
    def _sampler(cls, v: str) -> str:
        if v not in SAMPLERS:
            raise ValueError(f"must be one of {', '.join(SAMPLERS)}")
        return v

    @validator("dressing")
    def _dressing(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(v) - set(DRESSING_FIELDS))
        if unknown:
            raise ValueError(f"unknown options {unknown}; known: {list(DRESSING_FIELDS)}")
        return v

    def garment_set(self) -> str:
        """What decides this job's garment features besides the image size: its garments and dressing options."""
        return json.dumps([self.garments, self.dressing], sort_keys=True)


@dataclass(frozen=True)
class Task:
    """One image: a job at one seed."""

    job: Job
    seed: int

    @property
    def key(self) -> str:
        return f"{self.job.id}-{self.seed}"

    def group(self) -> tuple:
        """Tasks with equal groups share features and may share a UNet batch."""
        j = self.job
        return (j.garment_set(), j.width, j.height, j.steps, j.cfg_scale, j.sampler, j.negative_prompt, bool(j.pose),
                j.pose_weight)  # fmt: skip


@dataclass(frozen=True)
class BadJob:
    line: int
    id: str
    reason: str


def read_manifest(path: Path, defaults: dict[str, Any] | None = None) -> tuple[list[Job], list[BadJob]]:
    """The usable jobs (garment paths made absolute) and the lines that are not, in file order; `defaults`
    fill what a job leaves out (the command's --sampler)."""
    jobs: list[Job] = []
    bad: list[BadJob] = []
    seen: set[str] = set()
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        try:
            job = _job(json.loads(text), number, path.parent, defaults or {})
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            reason = f"not a JSON object: {e}" if isinstance(e, json.JSONDecodeError) else str(e)
            bad.append(BadJob(number, f"line{number}", reason))
            continue
        if job.id in seen:
            bad.append(BadJob(number, job.id, f"the id '{job.id}' is used by an earlier line"))
            continue
        seen.add(job.id)
        jobs.append(job)
    return jobs, bad


def _job(data: Any, line: int, folder: Path, defaults: dict[str, Any]) -> Job:
    if not isinstance(data, dict):
        raise TypeError("a job must be a JSON object")
    data = {**defaults, **data}
    if "seed" in data:
        if "seeds" in data:
            raise ValueError("give 'seed' or 'seeds', not both")
        data["seeds"] = [data.pop("seed")]
    content = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]
    try:
        job = Job(**data, line=line)
    except ValidationError as e:
        raise ValueError(problems_of(e)) from None
    if not job.seeds:
        raise ValueError("seeds: at least one seed")
    job.id = _safe_name(job.id) if job.id else content
    if job.pose:
        job.pose = str((folder / job.pose).resolve())
    for index, garment in enumerate(job.garments, start=1):
        if not isinstance(garment, dict) or not garment.get("image"):
            raise ValueError(f"garment {index}: needs an 'image' path")
        for field in ("image", "mask"):
            if isinstance(garment.get(field), str):
                garment[field] = str((folder / garment[field]).resolve())
    return job


def _safe_name(text: str) -> str:
    """An id usable as a file name on every system (other characters become '_')."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)[:100] or "job"


def tasks_in_order(jobs: list[Job]) -> list[Task]:
    """Every image of every job, grouped by garment set (features computed once per set), then by the settings
    that let images share a UNet batch; within that, manifest order."""
    tasks = [Task(job, seed) for job in jobs for seed in job.seeds]
    first_seen: dict[str, int] = {}
    for i, task in enumerate(tasks):
        first_seen.setdefault(task.job.garment_set(), i)
    return sorted(tasks, key=lambda t: (first_seen[t.job.garment_set()], repr(t.group())))
