"""Renders tasks in one process: the engine as the WebUI runs it (DressingSession on the UNet, the feature
cache), garment features extracted once per garment set and size, images of one set sampled together.

A task that cannot be rendered (an unreadable garment, a region too small, out of memory) comes back as a
failed record naming the reason; the next ones still run. The UNet is left as it was after every batch.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..files.images import ImageInputError
from ..generation.infotext import infotext
from ..generation.options import DressingOptions, from_values
from ..generation.prepare import FeatureCache
from ..generation.session import DressingSession, HostContext
from ..sd.checkpoint import StableDiffusion
from ..sd.sampling import guidance_layout
from .control import control_residuals, pose_tensor
from .jobs import Task
from .model import BatchModel
from .parameters import parameters_text, png_bytes
from .samplers import SAMPLERS, initial_noise, sample

EXPECTED = (ImageInputError, OSError, ValueError, torch.cuda.OutOfMemoryError)  # a job's fault, or the device's


@dataclass
class Rendered:
    """One task's outcome: the PNG (parameters inside) or None, and its line for the results file."""

    key: str
    png: bytes | None
    record: dict[str, Any] = field(default_factory=dict)


class BatchRunner:
    def __init__(self, model: BatchModel, batch_size: int = 4) -> None:
        self.model = model
        self.batch_size = max(1, batch_size)
        self.cache = FeatureCache(max_entries=2)
        self.garments_net = model.dressing.garments_net(model.sd.unet)
        self.extractions = 0  # GarmentsNet passes run (bench-batch and the tests read it)
        self._empty_prompt: torch.Tensor | None = None

    def run(self, tasks: list[Task]) -> Iterator[Rendered]:
        """Tasks in the order given (see jobs.tasks_in_order), consecutive ones of one group batched."""
        for batch in _batches(tasks, self.batch_size):
            start = time.perf_counter()
            try:
                opts = dressing_options(batch[0])
                pngs, notes, features = self._render(batch, opts)
            except EXPECTED as e:
                for task in batch:
                    yield Rendered(task.key, None, record(task, "failed", problems=[str(e)]))
                continue
            seconds = round((time.perf_counter() - start) / len(batch), 3)
            for task, png in zip(batch, pngs, strict=True):
                outcome = record(task, "ok", seconds=seconds, garment_features=features, notes=notes)
                yield Rendered(task.key, png, outcome)

    def _render(self, tasks: list[Task], opts: DressingOptions) -> tuple[list[bytes], list[str], str | None]:
        model, sd, job = self.model, self.model.sd, tasks[0].job
        latent_hw = (job.height // 8, job.width // 8)
        noise, generators = initial_noise([t.seed for t in tasks], (sd.unet.in_channels, *latent_hw))
        noise = noise.to(model.device, model.dtype)
        copies, _ = guidance_layout(len(tasks), opts.garment_guidance)
        size_hw = (job.height, job.width)
        with torch.no_grad():
            cond = sd.unet_conditioning([t.job.prompt for t in tasks], size_hw)
            uncond = _negative(sd, [job.negative_prompt] * len(tasks), size_hw)
        rows = {k: torch.cat([cond[k], *[uncond[k]] * (copies - 1)]) for k in cond}  # garments-only rows: negative
        session, notes, features = None, [], None
        if opts.slots:
            session = DressingSession(model.dressing, opts)
            prepared = session.prepare(self.garments_net, self._host(), target_wh=(job.width, job.height),
                                       cache=self.cache, model_key=model.cache_key)  # fmt: skip
            self.extractions += not prepared.from_cache
            notes, features = prepared.notes, "cached" if prepared.from_cache else "extracted"
        n_cond = len(tasks) * (copies - 1)
        hints = self._hints(tasks, copies)
        residuals: dict[str, object] = {}

        def unet_rows(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if hints is not None:  # the ControlNet sees every row, as the WebUI's does by default ("Balanced")
                down, mid = model.controlnet(x, t, rows["context"], hints, conditioning_scale=job.pose_weight,
                                             return_dict=False)  # fmt: skip
                residuals.update(down=list(down), mid=mid)
            return sd.unet(x, t, **rows)

        try:
            if session is not None:
                session.install(sd.unet)
            with control_residuals(sd.unet, residuals):
                latents = sample(
                    unet_rows, noise, generators, sampler=job.sampler, prediction=sd.prediction, steps=job.steps,
                    cfg_scale=job.cfg_scale, garment_guidance=opts.garment_guidance,
                    on_step=None if session is None else (lambda i, n: session.on_step(i, n, n_cond)),
                )  # fmt: skip
        finally:
            if session is not None:
                session.close()
        with torch.no_grad():
            pixels = sd.decode_latents(latents)
        strength = session.strength if session is not None else None
        pngs = [png_bytes(_to_image(pixels[i]), self._parameters(task, opts, strength)) for i, task in enumerate(tasks)]
        return pngs, notes, features

    def _hints(self, tasks: list[Task], copies: int) -> torch.Tensor | None:
        """The pose images of the batch, one per row of every guidance copy; None without poses."""
        job = tasks[0].job
        if not job.pose:
            return None
        if self.model.controlnet is None:
            raise ValueError("the job has a pose image but the batch has no ControlNet model (--controlnet FILE)")
        if self.model.sd.is_sdxl:
            raise ValueError("pose images work with SD1.x checkpoints only in dress-batch for now")
        poses = [pose_tensor(_open(t.job.pose, "pose image"), (job.width, job.height)) for t in tasks]
        return torch.cat([torch.stack(poses)] * copies).to(self.model.device, self.model.dtype)

    def _host(self) -> HostContext:
        sd = self.model.sd
        if self._empty_prompt is None:
            with torch.no_grad():
                self._empty_prompt = sd.unet_conditioning([""], (512, 512))["context"]
        return HostContext(self.model.device, self.model.dtype, sd.encode_images, self._empty_prompt)

    def _parameters(self, task: Task, opts: DressingOptions, strength: float | None) -> str:
        job, spec = task.job, SAMPLERS[task.job.sampler]
        entries: dict[str, object] = {
            "Steps": job.steps,
            "Sampler": spec.a1111_sampler,
            "Schedule type": spec.a1111_schedule,
            "CFG scale": job.cfg_scale,
            "Seed": task.seed,
            "Size": f"{job.width}x{job.height}",
            "Model hash": self.model.checkpoint_hash,
            "Model": self.model.checkpoint_name,
            "RNG": "CPU",  # the noise is drawn on the CPU: A1111 draws the same with this setting
        }
        if job.pose:  # the WebUI ControlNet's own entry, so a paste sets the unit (the pose image is not pasted)
            entries["ControlNet 0"] = (
                f"Module: none, Model: {self.model.controlnet_label}, Weight: {job.pose_weight:g}, "
                "Resize Mode: Crop and Resize, Guidance Start: 0.0, Guidance End: 1.0, Control Mode: Balanced"
            )
        if opts.slots and strength is not None:
            entries.update(infotext(opts, self.model.dressing_label, strength))
        return parameters_text(job.prompt, job.negative_prompt, entries)


def _negative(sd: StableDiffusion, prompts: list[str], size_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The negative rows' conditioning; on SDXL an all-empty negative prompt is zeros, as A1111 gives it."""
    if sd.is_sdxl and not any(prompts):
        return sd.conditioner(prompts, size_hw, zero_text=True)
    return sd.unet_conditioning(prompts, size_hw)


def dressing_options(task: Task) -> DressingOptions:
    """The job's garments and dressing options checked as the WebUI checks them; the first problem raises."""
    slots = []
    for garment in task.job.garments:
        values = dict(garment)
        for name in ("image", "mask"):
            if values.get(name):
                values[name] = _open(values[name], f"garment {len(slots) + 1} {name}")
        slots.append(values)
    opts = from_values({**task.job.dressing, "enabled": True}, slots)
    if opts.problems:
        raise ValueError("; ".join(opts.problems))
    return opts


def _open(path: str, what: str) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise ImageInputError(f"{what}: no file {path}") from None
    except OSError as e:
        raise ImageInputError(f"{what}: {path} is not a readable image ({e})") from None
    return image


def _to_image(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] to RGB as A1111 converts samples (clamped, scaled by 255, truncated)."""
    a = torch.clamp((x.detach().float().cpu() + 1.0) / 2.0, 0.0, 1.0)
    return Image.fromarray((255.0 * a.permute(1, 2, 0).numpy()).astype(np.uint8), "RGB")


def _batches(tasks: list[Task], size: int) -> Iterator[list[Task]]:
    batch: list[Task] = []
    for task in tasks:
        if batch and (len(batch) == size or task.group() != batch[0].group()):
            yield batch
            batch = []
        batch.append(task)
    if batch:
        yield batch


def record(task: Task, status: str, **extra: Any) -> dict[str, Any]:
    return {"id": task.job.id, "seed": task.seed, "line": task.job.line, "status": status, **extra}
