"""The batch command's samplers: diffusers' schedulers, named and written down as A1111 names them.

diffusers (a well-kept library, already the tests' reference for UNet key layouts, and shipped with Forge)
rather than our own code beyond the demo's DDIM: DPM-Solver++ and the ancestral Euler step are easy to get
subtly wrong. The schedules follow what A1111 runs for the same names (SD's scaled-linear betas; Karras
sigmas for DPM++ 2M, evenly spaced timesteps for Euler a, A1111's DDIM timesteps), so an image's parameters
pasted into the WebUI pick the same sampler and schedule (and, checked live in A1111 1.10.1 on the CPU, give the
same image within one level per pixel: its k-diffusion and these solvers agree).

Noise is drawn per image from a CPU generator seeded with the image's seed (A1111's "RNG: CPU"), for the
start and for every ancestral step, so an image does not depend on the batch it was sampled in.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..sd.sampling import combine_guidance, guidance_layout

# (x rows, timestep rows) -> the model's output for the rows of `guidance_layout`, stacked
RowModel = Callable[[Tensor, Tensor], Tensor]
SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler as a manifest names it, as A1111's infotext writes it, and how diffusers builds it."""

    a1111_sampler: str
    a1111_schedule: str
    scheduler: str  # the diffusers class
    config: dict[str, Any]


SAMPLERS: dict[str, SamplerSpec] = {
    "DPM++ 2M Karras": SamplerSpec(
        "DPM++ 2M", "Karras", "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "Euler a": SamplerSpec("Euler a", "Automatic", "EulerAncestralDiscreteScheduler", {"timestep_spacing": "linspace"}),
    "DDIM": SamplerSpec(
        "DDIM", "Automatic", "DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
    ),
}  # fmt: skip


NO_DIFFUSERS = "dress-batch samples with diffusers' schedulers: pip install diffusers (tested: 0.27.2 and 0.31.0)"


def require_diffusers() -> None:
    """Raise RuntimeError with what to install when diffusers is missing (checked before a model loads)."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise RuntimeError(NO_DIFFUSERS) from None


def build_scheduler(name: str, prediction: str) -> Any:
    """A fresh diffusers scheduler for `name` (a SAMPLERS key); `prediction` is the model's "eps" or "v"."""
    import diffusers

    spec = SAMPLERS[name]
    kind = "v_prediction" if prediction == "v" else "epsilon"
    return getattr(diffusers, spec.scheduler)(**SD_BETAS, **spec.config, prediction_type=kind)


def initial_noise(seeds: list[int], latent_shape: tuple[int, int, int]) -> tuple[Tensor, list[torch.Generator]]:
    """(B, C, H, W) starting noise and each image's generator, left where the next draw continues."""
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    return torch.stack([torch.randn(latent_shape, generator=g) for g in generators]), generators


@torch.no_grad()
def sample(
    model: RowModel,
    noise: Tensor,
    generators: list[torch.Generator],
    *,
    sampler: str,
    prediction: str,
    steps: int,
    cfg_scale: float,
    garment_guidance: float | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> Tensor:
    """Denoise `noise` (unit variance, on the model's device) in `steps` steps with classifier-free guidance
    (and MagicClothing's garment guidance when given). `on_step(i, steps)` runs before step i's model call."""
    scheduler = build_scheduler(sampler, prediction)
    scheduler.set_timesteps(steps, device=noise.device)
    x = noise * scheduler.init_noise_sigma
    copies, _ = guidance_layout(x.shape[0], garment_guidance)
    extra = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for i, t in enumerate(scheduler.timesteps):
        if on_step is not None:
            on_step(i, steps)
        rows = scheduler.scale_model_input(torch.cat([x] * copies), t)
        out = model(rows, t.expand(rows.shape[0]).to(rows.dtype))
        x = scheduler.step(combine_guidance(out, cfg_scale, garment_guidance), t, x, **extra).prev_sample
    return x
