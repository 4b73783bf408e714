"""The teacher: many-step uniform DDIM from each seed's x_T, the target every recon error is measured against.

One builder for every caller (the in-process evaluator, the Ray sampler actors, the DP placement's
trajectory), so they all mean the same teacher: uniform DDIM (eta = 0) over `nfe` steps, default every
training timestep.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from pipeline.core.schedules import uniform
from pipeline.solvers.ddim import Denoiser, ddim_sample


def teacher_timesteps(alphas_cumprod: torch.Tensor, nfe: int | None = None) -> list[int]:
    """The teacher's schedule: uniform with `nfe` steps (default T = len(alphas_cumprod), every timestep)."""
    T = int(alphas_cumprod.numel())
    return list(uniform(T if nfe is None else int(nfe), alphas_cumprod).timesteps)


def run_teacher(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    timesteps: Sequence[int],
    alphas_cumprod: torch.Tensor,
    *,
    batch_size: int | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> torch.Tensor:
    """Teacher outputs x_0 [B, ...] from x_T [B, ...] along `timesteps` (deterministic DDIM).

    `batch_size`: run the rows in chunks of this many (None: one call); `callback` is passed to
    `ddim_sample` (one call only, so it sees whole-batch states).
    """
    if batch_size is None:
        return ddim_sample(denoiser, x_T, timesteps, alphas_cumprod, eta=0.0, generator=None, callback=callback)
    if callback is not None:
        raise ValueError("callback needs the teacher in one call (batch_size=None)")
    outs = [ddim_sample(denoiser, x_T[i : i + batch_size], timesteps, alphas_cumprod)
            for i in range(0, len(x_T), batch_size)]
    return torch.cat(outs)
