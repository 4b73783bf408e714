"""Transfer table: does a step placement learned for DDIM also help other samplers?

For one model, one seed set and a budget of N **model evaluations**, every sampler runs twice from the
same x_T per seed: under the given spacing (typically a learned schedule) and under the sampler's own
default spacing, and each output is compared with the many-step DDIM teacher
(`pipeline.evaluation.inprocess.make_teacher`), per-dimension MSE on a [0, 1] scale (`pipeline.metrics.recon`).

==================  ========================================================  ======================
sampler             implementation                                            default spacing
==================  ========================================================  ======================
``ddim``            `pipeline.solvers.ddim.ddim_sample` (eta = 0)                     diffusers DDIM's
                                                                              ``leading`` = `uniform`
``dpmsolver++2m``   ``DPMSolverMultistepScheduler(solver_order=2,             its ``set_timesteps(n)``
                    algorithm_type="dpmsolver++")``                           (``linspace``)
``euler``           ``EulerDiscreteScheduler`` (Euler on the PF-ODE in sigma)  its ``set_timesteps(n)``
``heun``            ``HeunDiscreteScheduler`` (2 evaluations a step, 1 on the  its ``set_timesteps(n)``
                    last: `pipeline.interop.apply.model_evaluations`)
==================  ========================================================  ======================

Equal NFE: each sampler gets the most steps m whose evaluations fit the budget
(``model_evaluations(m) <= N``): m = N for the first-order-cost samplers, m = (N + 1) // 2 for Heun
(2m - 1 evaluations: 9 for N = 10). A schedule with n != m steps is carried to m steps by log-sigma
interpolation (Align Your Steps' rule, `pipeline.core.schedules.interpolated`); the table says which.

The diffusers schedulers are built from the model's own ``alphas_cumprod`` (``trained_betas`` =
1 - abar_t / abar_{t-1}), so none of them runs its class's default beta table (HeunDiscrete's default is
0.00085..0.012). diffusers rebuilds abar in float32 from those betas: it matches the model's within
1e-6 relative, which `scheduler_for` checks; `pipeline.interop.apply.apply_schedule` is then told to accept it.

The loop (`sample_with_scheduler`) is the one every diffusers pipeline runs, over the model's eps
denoiser, with two details: x_T is scaled so that the first *model input* is exactly x_T (the VP sample
at the first level, as DDIM and the teacher see it; ``init_noise_sigma`` is off by
sigma / sqrt(sigma^2 + 1) for ``linspace`` spacing), and fractional timesteps (Heun's and Euler's
default spacings at some n, e.g. 749.25) are rounded to the nearest integer for the denoiser contract
(k-diffusion's ``quantize=True``); the table counts them (``t_rounded``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.solvers.ddim import Denoiser, ddim_sample
from pipeline.interop.ddim_scheduler import StrideDDIMScheduler
from pipeline.errors import StridelabError
from pipeline.evaluation.inprocess import Teacher
from pipeline.interop.apply import apply_schedule, check_compatible, model_evaluations
from pipeline.metrics.recon import per_sample_mse, recon_sem
from pipeline.models.load import LoadedModel
from pipeline.core.noise import as_alphas_cumprod
from pipeline.core.schedules import Schedule, interpolated, uniform

TABLE_TOLERANCE = 1e-6
"""Max relative difference between a scheduler's float32 abar (rebuilt from betas) and the model's."""


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler of the transfer table.

    Attributes:
        name: the CLI name.
        scheduler_cls: the diffusers scheduler class, or None for stridelab's own DDIM.
        config: extra scheduler config (on top of the model's betas).
        description: one line for tables and help.
    """

    name: str
    scheduler_cls: type | None
    config: dict[str, Any]
    description: str


def _registry() -> dict[str, SamplerSpec]:
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler

    return {
        "ddim": SamplerSpec("ddim", None, {}, "DDIM, eta = 0 (pipeline.solvers.ddim)"),
        "dpmsolver++2m": SamplerSpec("dpmsolver++2m", DPMSolverMultistepScheduler,
                                     {"solver_order": 2, "algorithm_type": "dpmsolver++"}, "DPM-Solver++(2M)"),
        "euler": SamplerSpec("euler", EulerDiscreteScheduler, {}, "Euler (EulerDiscreteScheduler)"),
        "heun": SamplerSpec("heun", HeunDiscreteScheduler, {}, "Heun, 2 evaluations a step (HeunDiscreteScheduler)"),
    }


SAMPLER_NAMES: tuple[str, ...] = ("ddim", "dpmsolver++2m", "euler", "heun")


def sampler_spec(name: str) -> SamplerSpec:
    """The registry entry for `name`; a one-line error listing the allowed names."""
    if name not in SAMPLER_NAMES:
        raise StridelabError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLER_NAMES)}")
    return _registry()[name]


def betas_from_alphas_cumprod(alphas_cumprod: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """beta_t = 1 - abar_t / abar_{t-1} (beta_0 = 1 - abar_0), float64: the inverse of abar = cumprod(1 - beta)."""
    abar = as_alphas_cumprod(alphas_cumprod)
    betas = torch.empty_like(abar)
    betas[0] = 1 - abar[0]
    betas[1:] = 1 - abar[1:] / abar[:-1]
    return betas


def scheduler_for(name: str, alphas_cumprod: torch.Tensor | Sequence[float]) -> Any:
    """A fresh scheduler for sampler `name` running the model's noise table (None config: stridelab DDIM).

    Returns a `StrideDDIMScheduler` for ``ddim`` (only for `model_evaluations`; sampling goes through
    `pipeline.solvers.ddim.ddim_sample`), else the diffusers scheduler with ``trained_betas`` from `alphas_cumprod`.

    Raises:
        StridelabError: unknown name, or the scheduler's table differs from the model's by more than
            `TABLE_TOLERANCE` (relative).
    """
    spec = sampler_spec(name)
    abar = as_alphas_cumprod(alphas_cumprod)
    if spec.scheduler_cls is None:
        return StrideDDIMScheduler(num_train_timesteps=abar.numel(),
                                   trained_betas=betas_from_alphas_cumprod(abar).tolist())
    sched = spec.scheduler_cls(num_train_timesteps=abar.numel(),
                               trained_betas=betas_from_alphas_cumprod(abar).tolist(), **spec.config)
    own = as_alphas_cumprod(sched.alphas_cumprod)
    rel = ((own - abar).abs() / abar).max().item()
    if rel > TABLE_TOLERANCE:
        raise StridelabError(f"{type(sched).__name__} rebuilt alphas_cumprod {rel:.2g} (relative) away from the "
                             f"model's, more than {TABLE_TOLERANCE:g}")
    return sched


def steps_for_budget(name: str, nfe: int, alphas_cumprod: torch.Tensor | Sequence[float]) -> int:
    """The most steps m of sampler `name` whose model evaluations fit in `nfe` (Heun: (nfe + 1) // 2)."""
    probe = scheduler_for(name, alphas_cumprod)
    if model_evaluations(probe, 1) > nfe:
        raise StridelabError(f"{name} needs {model_evaluations(probe, 1)} model evaluations for one step, budget {nfe}")
    m = 1
    while model_evaluations(probe, m + 1) <= nfe:
        m += 1
    return m


def steps_of(scheduler: Any) -> list[float]:
    """The distinct step timesteps of a configured scheduler, in order (Heun lists each corrector twice)."""
    out: list[float] = []
    for t in scheduler.timesteps.tolist():
        if not out or float(t) != out[-1]:
            out.append(float(t))
    return out


@torch.no_grad()
def sample_with_scheduler(denoiser: Denoiser, x_T: torch.Tensor, scheduler: Any) -> torch.Tensor:
    """Run a configured diffusers scheduler over an eps denoiser from VP noise x_T; return x_0.

    The pipelines' loop (``scale_model_input`` -> model -> ``step``), starting from x_T divided by the
    first step's input scale, so that the model's first input is exactly x_T. Timesteps are rounded to
    integers for the denoiser contract.
    """
    ts = scheduler.timesteps
    c_in = scheduler.scale_model_input(x_T.new_ones(()), ts[0])  # 1 (VP schedulers) or 1/sqrt(sigma_0^2+1)
    x = x_T / c_in
    for t in ts:
        t_int = torch.full((x.shape[0],), int(round(float(t))), dtype=torch.long, device=x.device)
        eps = denoiser(scheduler.scale_model_input(x, t), t_int).to(x.dtype)
        x = scheduler.step(eps, t, x).prev_sample
    return x


def _apply(scheduler: Any, schedule: Schedule, abar: torch.Tensor) -> Any:
    """`apply_schedule` with the model's table checked exactly here and the scheduler's float32 rebuild allowed."""
    check_compatible(schedule, abar, what="the model")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*alphas_cumprod.*")
        # sample_with_scheduler scales x_T itself (exactly), not by init_noise_sigma.
        warnings.filterwarnings("ignore", message=".*scales the initial noise.*")
        return apply_schedule(scheduler, schedule, abar, allow_other_model=True)


def run_sampler(
    name: str,
    model: LoadedModel,
    x_T: torch.Tensor,
    steps: Schedule | int,
) -> tuple[torch.Tensor, list[float], int]:
    """Sample with sampler `name` from x_T under a schedule, or under its default spacing with `steps` steps.

    Returns:
        (x_0, the step timesteps run, model evaluations spent).
    """
    abar = as_alphas_cumprod(model.alphas_cumprod)
    if name == "ddim":
        sched = steps if isinstance(steps, Schedule) else uniform(int(steps), abar)
        if isinstance(steps, Schedule):
            check_compatible(sched, abar, what="the model")
        return ddim_sample(model.denoiser, x_T, sched.timesteps, model.alphas_cumprod), [float(t) for t in sched.timesteps], sched.nfe
    scheduler = scheduler_for(name, abar)
    if isinstance(steps, Schedule):
        _apply(scheduler, steps, abar)
    else:
        scheduler.set_timesteps(int(steps))
    x0 = sample_with_scheduler(model.denoiser, x_T, scheduler)
    return x0, steps_of(scheduler), len(scheduler.timesteps)


def carry_to_steps(schedule: Schedule, m: int, alphas_cumprod: torch.Tensor | Sequence[float]) -> Schedule:
    """`schedule` itself when it has m steps, else its log-sigma interpolation to m steps (same end points)."""
    if schedule.nfe == m:
        return schedule
    s = interpolated(m, alphas_cumprod, reference=schedule.timesteps)
    return Schedule(s.timesteps, s.num_train_timesteps, f"{schedule.name}@{m}",
                    {"interpolated_from": list(schedule.timesteps)}, {})


def _is_integral(t: float) -> bool:
    """Within 1e-3 of an integer (EulerDiscrete recovers integer timesteps from float32 sigmas within 6e-5)."""
    return abs(t - round(t)) < 1e-3


def _fmt_t(ts: Sequence[float]) -> str:
    return " ".join(str(round(t)) if _is_integral(t) else f"{t:.2f}" for t in ts)


def transfer_table(
    model: LoadedModel,
    teacher: Teacher,
    spacing: Schedule | Callable[[int], Schedule],
    samplers: Sequence[str] = SAMPLER_NAMES,
    nfe: int | None = None,
    *,
    label: str | None = None,
) -> list[dict[str, Any]]:
    """Recon vs the teacher of each sampler under `spacing` and under its default spacing, at equal NFE.

    Args:
        model: the model (its denoiser and ``alphas_cumprod``).
        teacher: many-step DDIM outputs and x_T for the seed set; every row starts from ``teacher.x_T``.
        spacing: the schedule to transfer (carried to other step counts by `carry_to_steps`), or a
            function ``m -> Schedule`` (e.g. a named baseline at m steps).
        samplers: names from `SAMPLER_NAMES`.
        nfe: the budget of model evaluations (default: the schedule's NFE; required with a function).
        label: what to call the spacing in the ``schedule`` column (default: its name).
    Returns:
        One row per sampler x {spacing "learned", "default"}: ``sampler``, ``spacing``, ``nfe`` (budget),
        ``steps``, ``evals``, ``recon``, ``recon_sem``, ``vs_default`` (learned recon / default recon, on the
        learned row), ``t_rounded`` (fractional timesteps rounded for the model), ``how`` and ``timesteps``.
    """
    abar = as_alphas_cumprod(model.alphas_cumprod)
    bad = [s for s in samplers if s not in SAMPLER_NAMES]
    if bad:
        raise StridelabError(f"unknown sampler {bad[0]!r}; choose from {', '.join(SAMPLER_NAMES)}")
    if isinstance(spacing, Schedule):
        check_compatible(spacing, abar, what=model.spec)
        base = spacing
        nfe = base.nfe if nfe is None else nfe
        make = lambda m: carry_to_steps(base, m, abar)  # noqa: E731
        label = label or base.name
    else:
        if nfe is None:
            raise StridelabError("transfer_table: nfe is required when spacing is a function")
        make = spacing
        label = label or "spacing"
    ref01 = model.to_unit(teacher.x0)
    rows: list[dict[str, Any]] = []
    for name in samplers:
        m = steps_for_budget(name, nfe, abar)
        learned = make(m)
        pair = {}
        for kind, steps in (("learned", learned), ("default", m)):
            x0, ts, evals = run_sampler(name, model, teacher.x_T, steps)
            rec = per_sample_mse(model.to_unit(x0), ref01)
            if kind == "learned":
                carried = isinstance(spacing, Schedule) and spacing.nfe != m
                how = f"log-sigma interpolated {spacing.nfe}->{m} steps" if carried else "as is"
            else:
                how = "uniform (diffusers DDIM leading)" if name == "ddim" else f"set_timesteps({m})"
            pair[kind] = {
                "model": model.spec, "sampler": name, "spacing": kind,
                "schedule": label if kind == "learned" else "default", "nfe": nfe, "steps": m, "evals": evals,
                "recon": rec.mean().item(),
                "recon_sem": recon_sem(rec),
                "vs_default": None,
                "t_rounded": sum(not _is_integral(t) for t in ts), "how": how, "timesteps": _fmt_t(ts),
            }
        d = pair["default"]["recon"]
        pair["learned"]["vs_default"] = pair["learned"]["recon"] / d if d > 0 else math.nan
        del pair["default"]["vs_default"]  # shown as '-'
        rows += [pair["learned"], pair["default"]]
    return rows
