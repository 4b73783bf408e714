"""Each solver's diffusers twin on the model's own noise table, and the spacing it uses by default.

A user who picks DPM-Solver++ 2M and calls ``set_timesteps(10)`` gets diffusers' default spacing for
that scheduler (``linspace``: 999 899 ... 100 for T = 1000, then clean data). That spacing is the first
thing a learned schedule must beat, so `default_spacing` asks diffusers itself for it rather than
re-deriving it: the baseline ``default`` of a sweep and the reference rows of the held-out table.

Fractional defaults (EulerDiscrete/HeunDiscrete ``linspace`` at some n, e.g. 749.25) are rounded to
distinct integers (`pipeline.core.schedules.project_to_distinct`): stridelab's solvers evaluate the model
only at trained integer timesteps (k-diffusion's ``quantize=True``); the schedule's meta says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pipeline.core.noise import as_alphas_cumprod
from pipeline.core.schedules import Schedule, make_schedule, project_to_distinct
from pipeline.errors import StridelabError
from pipeline.interop.reuse import scheduler_class
from pipeline.solvers.registry import get_solver

TABLE_TOLERANCE = 1e-6
"""Max relative difference between a scheduler's float32 abar (rebuilt from betas) and the model's."""


def betas_from_alphas_cumprod(alphas_cumprod: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """beta_t = 1 - abar_t / abar_{t-1} (beta_0 = 1 - abar_0), float64: the inverse of abar = cumprod(1 - beta)."""
    abar = as_alphas_cumprod(alphas_cumprod)
    betas = torch.empty_like(abar)
    betas[0] = 1 - abar[0]
    betas[1:] = 1 - abar[1:] / abar[:-1]
    return betas


def diffusers_twin(solver: str, alphas_cumprod: torch.Tensor | Sequence[float], **extra: Any) -> Any:
    """A fresh diffusers scheduler for `solver` (its recorded class and config, + `extra`) on the model's abar table.

    Raises:
        StridelabError: the solver has no diffusers twin, or diffusers' float32 rebuild of the table is
            more than `TABLE_TOLERANCE` (relative) away from the model's.
    """
    spec = get_solver(solver)
    if spec.diffusers_class is None:
        raise StridelabError(f"solver {solver!r} has no diffusers scheduler (k-diffusion: {spec.k_diffusion}, "
                             f"ComfyUI: {spec.comfyui})")
    abar = as_alphas_cumprod(alphas_cumprod)
    cls = scheduler_class(spec.diffusers_class)
    sched = cls(num_train_timesteps=abar.numel(), trained_betas=betas_from_alphas_cumprod(abar).tolist(),
                **{**dict(spec.diffusers_config), **extra})
    own = as_alphas_cumprod(sched.alphas_cumprod)
    rel = ((own - abar).abs() / abar).max().item()
    if rel > TABLE_TOLERANCE:
        raise StridelabError(f"{cls.__name__} rebuilt alphas_cumprod {rel:.2g} (relative) away from the model's, "
                             f"more than {TABLE_TOLERANCE:g}")
    return sched


def distinct_steps(scheduler: Any) -> list[float]:
    """The distinct step timesteps of a configured scheduler, in order (Heun lists each corrector twice)."""
    out: list[float] = []
    for t in scheduler.timesteps.tolist():
        if not out or float(t) != out[-1]:
            out.append(float(t))
    return out


def default_spacing(solver: str, n: int, alphas_cumprod: torch.Tensor | Sequence[float]) -> Schedule:
    """The n-step spacing `solver`'s diffusers scheduler uses after ``set_timesteps(n)``, named ``default``.

    DDIM's is diffusers DDIMScheduler's ``leading`` = `uniform`; a solver without a diffusers twin uses its
    ``diffusers_default`` schedule by name. ``meta``: the solver and how the spacing was obtained.
    """
    spec = get_solver(solver)
    abar = as_alphas_cumprod(alphas_cumprod)
    T = abar.numel()
    if spec.diffusers_class in (None, "StrideDDIMScheduler"):
        base = make_schedule("uniform" if spec.name == "ddim" else spec.diffusers_default, n, abar)
        return Schedule(base.timesteps, T, "default", {"solver": spec.name, "how": f"{base.name} ({spec.name})"})
    sched = diffusers_twin(solver, abar)
    sched.set_timesteps(int(n))
    ts = distinct_steps(sched)
    if len(ts) != n:
        raise StridelabError(f"{spec.diffusers_class}.set_timesteps({n}) gave {len(ts)} distinct steps, not {n}")
    rounded = sum(abs(t - round(t)) > 1e-3 for t in ts)
    how = f"{spec.diffusers_class}.set_timesteps({n})" + (f", {rounded} fractional rounded" if rounded else "")
    return Schedule(project_to_distinct(ts, T), T, "default", {"solver": spec.name, "how": how})
