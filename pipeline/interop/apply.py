"""Reuse a stridelab `Schedule` in diffusers, k-diffusion, or any tool that reads JSON.

A schedule is a list of integer timesteps of one model's noise schedule (``alphas_cumprod``); the same
integers mean other noise levels under another table, so every function here first checks that the
target has the schedule's T and, when ``schedule.meta`` carries an ``alphas_cumprod_sha256`` (exports
do), the same table (`check_compatible`).

diffusers (0.42), one call each (`apply_schedule`):

==============================  ============  ======================  =====================================
scheduler                       passed as     model evaluations       equals DDIM on the same steps?
==============================  ============  ======================  =====================================
``StrideDDIMScheduler``         timesteps     n                       yes (it *is* `pipeline.solvers.ddim.ddim_step`)
``DPMSolverMultistepScheduler``  timesteps     n                       solver_order=1, dpmsolver++: yes
                                                                      (DPM-Solver-1 = DDIM); order 2: no
``EulerDiscreteScheduler``      sigmas (n+1)  n                       yes up to float32 (Euler on the
                                                                      PF-ODE in sigma = DDIM, eta = 0)
``HeunDiscreteScheduler``       timesteps     2n - 1                  no (2nd order)
``DDPMScheduler``               timesteps     n                       DDIM with eta = 1 (ancestral)

``UniPCMultistepScheduler``     assigned      n                       no (2nd order, UniC corrector)
==============================  ============  ======================  =====================================

diffusers' own ``DDIMScheduler`` (and PNDM, LMS, ...) cannot: use `StrideDDIMScheduler`. UniPC's
``set_timesteps`` (0.42) takes no ``timesteps=`` and ``sigmas=`` only with ``use_flow_sigmas=True`` (flow
matching, not these VP models), so `apply_schedule` calls ``set_timesteps(n)`` (which resets its multistep
state) and then assigns the exact integer timesteps and the float32 sigmas that ``set_timesteps`` itself
computes at integer timesteps; a pipeline's ``pipe(timesteps=...)`` cannot pass the schedule to it.

The solver a schedule was tuned with: exports record it (``meta["solver"]``, `SolverSpec.record`);
`apply_schedule` warns when the scheduler it configures runs another update (`pipeline.interop.reuse`,
where `scheduler_for_schedule` builds exactly the recorded scheduler from a pipeline's config). A pipeline
re-spaces the steps in its own ``set_timesteps(n)`` call: `pipeline.interop.pipelines.sample_with_schedule`
runs one on exactly the schedule.

Elsewhere (`pipeline.interop.sigma_lists`): `k_diffusion_sigmas` (n + 1 sigmas ending in 0, for
``k_diffusion.sampling.sample_*``), `schedule_from_sigmas` (back), `comfyui_sigma_string` (ComfyUI's
ManualSigmas input, and `parse_sigma_string` back), `to_plain_json` (timesteps, sigmas and abar at each
step, the solver).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pipeline.errors import StridelabError
from pipeline.interop.reuse import solver_mismatch
from pipeline.core.noise import as_alphas_cumprod
from pipeline.core.schedules import MODEL_SHIFT_KEY, Schedule

SUPPORTED_SCHEDULERS: dict[str, str] = {
    "StrideDDIMScheduler": "timesteps",
    "DPMSolverMultistepScheduler": "timesteps",
    "EulerDiscreteScheduler": "sigmas",
    "HeunDiscreteScheduler": "timesteps",
    "DDPMScheduler": "timesteps",
    "UniPCMultistepScheduler": "assigned",
}
"""diffusers scheduler class -> how `apply_schedule` passes the schedule: ``set_timesteps(timesteps=)``,
``set_timesteps(sigmas=)``, or ``set_timesteps(n)`` and then timesteps and sigmas assigned (see above)."""


def alphas_cumprod_sha256(alphas_cumprod: torch.Tensor | Sequence[float]) -> str:
    """sha256 hex digest of abar as little-endian float64 bytes: the fingerprint exports carry."""
    a = as_alphas_cumprod(alphas_cumprod).numpy().astype("<f8")
    return hashlib.sha256(a.tobytes()).hexdigest()


def check_compatible(
    schedule: Schedule,
    alphas_cumprod: torch.Tensor | Sequence[float],
    *,
    what: str = "the target",
    allow_other_model: bool = False,
    warn_unhashed: bool = False,
) -> torch.Tensor:
    """Check that `schedule` was made for `alphas_cumprod`; return the table as float64.

    A different T always raises. A different table (``schedule.meta["alphas_cumprod_sha256"]`` present
    and not equal to this table's hash) raises, or only warns with ``allow_other_model=True``. Without a
    hash in the schedule only T can be checked; ``warn_unhashed=True`` (a schedule read from a file, where
    the hash is expected) says so in a warning. This is the one compatibility check: export and reuse both
    call it.

    Raises:
        StridelabError: naming `what`, both T or both hash prefixes, and the way out.
    """
    abar = as_alphas_cumprod(alphas_cumprod)
    T = abar.numel()
    if schedule.num_train_timesteps != T:
        raise StridelabError(
            f"schedule {schedule.name!r} is for T = {schedule.num_train_timesteps} training timesteps, "
            f"{what} has T = {T}"
        )
    want = schedule.meta.get("alphas_cumprod_sha256")
    if want is None:
        if warn_unhashed:
            warnings.warn(f"schedule has no alphas_cumprod_sha256: cannot check it was made for {what}", stacklevel=3)
        return abar
    have = alphas_cumprod_sha256(abar)
    if want != have:
        msg = (
            f"schedule {schedule.name!r} was tuned for {schedule.meta.get('model', 'another model')} "
            f"(alphas_cumprod sha256 {str(want)[:12]}...), {what} has {have[:12]}...: the same timesteps "
            "are other noise levels there"
        )
        if not allow_other_model:
            raise StridelabError(msg + "; pass `allow_other_model` to use it anyway")
        warnings.warn(msg, stacklevel=3)
    return abar


def warn_if_exported_for_other_model(schedule: Schedule, model: str, *, stacklevel: int = 2) -> bool:
    """One warning when `schedule` records the model it was exported for (``meta["model"]``) and that is not
    `model` (a model spec): the alphas_cumprod hash `check_compatible` compares cannot tell two models on
    one noise table apart (bundled:digits and gmm:ring8 share linear betas). Returns whether it warned."""
    made_for = schedule.meta.get("model")
    if made_for is None or str(made_for) == str(model):
        return False
    warnings.warn(f"schedule {schedule.name!r} was learned on model {made_for}, running it on {model}: its steps "
                  f"were placed for the other model", stacklevel=stacklevel + 1)
    return True


def warn_if_shift_dropped(schedule: Schedule, consumer: str, *, stacklevel: int = 3) -> None:
    """Warn when `schedule` carries a model time shift (`Schedule.model_shift`) that `consumer` cannot run: every
    sampler but stridelab's own and `StrideDDIMScheduler` asks the network at the level it integrates at."""
    if schedule.model_shift is not None:
        warnings.warn(f"the schedule's model time shift ({MODEL_SHIFT_KEY}) is dropped: {consumer} asks the network "
                      "at the level it integrates at; only StrideDDIMScheduler.from_schedule and stridelab's own "
                      "solvers run it", stacklevel=stacklevel)


def supported_name(scheduler: Any) -> str | None:
    """The `SUPPORTED_SCHEDULERS` class `scheduler` is (or subclasses), or None."""
    for cls in type(scheduler).__mro__:
        if cls.__name__ in SUPPORTED_SCHEDULERS:
            return cls.__name__
    return None


def _unsupported(scheduler: Any) -> StridelabError:
    name = type(scheduler).__name__
    why = ""
    if name == "DDIMScheduler":
        why = (" (its set_timesteps takes no timesteps= and its step assumes even spacing, t - T // N; use "
               "pipeline.interop.ddim_scheduler.StrideDDIMScheduler.from_config(scheduler.config, clip_sample=False, "
               "thresholding=False) instead, or sample_with_schedule(pipe, schedule))")
    return StridelabError(
        f"{name} cannot run a custom timestep schedule{why}; schedulers that can: "
        f"{', '.join(SUPPORTED_SCHEDULERS)}"
    )


def model_evaluations(scheduler: Any, nfe: int) -> int:
    """Network evaluations `scheduler` spends on an `nfe`-step schedule (Heun: 2 nfe - 1, others: nfe)."""
    name = supported_name(scheduler)
    if name is None:
        raise _unsupported(scheduler)
    return 2 * nfe - 1 if name == "HeunDiscreteScheduler" else nfe


def apply_schedule(
    scheduler: Any,
    schedule: Schedule,
    alphas_cumprod: torch.Tensor | Sequence[float] | None = None,
    *,
    device: str | torch.device | None = None,
    allow_other_model: bool = False,
) -> Any:
    """Configure a diffusers scheduler instance to run `schedule` (calls its ``set_timesteps``).

    Then drive it as usual (``for t in scheduler.timesteps: ... scheduler.step(...)``). A pipeline calls
    ``set_timesteps`` itself and so undoes this: run one with
    `pipeline.interop.pipelines.sample_with_schedule`, which checks the steps it actually ran.

    Args:
        scheduler: one of `SUPPORTED_SCHEDULERS` (or a subclass).
        schedule: the schedule (e.g. ``Schedule.load("schedule.json")``).
        alphas_cumprod: the model's abar table: must equal the scheduler's. Pass it whenever the schedule
            has no ``alphas_cumprod_sha256`` (a warning says so): diffusers' scheduler classes have different
            default betas, so a scheduler built with defaults may silently use another noise table.
        device: where the scheduler's timesteps go.
        allow_other_model: warn instead of raising when the abar tables differ (different T always raises).
    Returns:
        `scheduler`, configured.
    Raises:
        StridelabError: an unsupported scheduler class (listing the supported ones), a T or alphas_cumprod
            mismatch, or a scheduler config that cannot take custom steps (e.g. ``use_karras_sigmas``).
    """
    name = supported_name(scheduler)
    if name is None:
        raise _unsupported(scheduler)
    own = getattr(scheduler, "alphas_cumprod", None)
    if own is None:
        raise StridelabError(f"{type(scheduler).__name__} has no alphas_cumprod to check the schedule against")
    abar = check_compatible(schedule, own, what=type(scheduler).__name__, allow_other_model=allow_other_model)
    if alphas_cumprod is None and "alphas_cumprod_sha256" not in schedule.meta:
        # Defaults differ between diffusers' schedulers (HeunDiscrete: betas 0.00085..0.012, DDPM: 0.0001..0.02).
        warnings.warn(
            f"only T was checked: schedule {schedule.name!r} carries no alphas_cumprod_sha256 and no "
            f"alphas_cumprod was passed, so {type(scheduler).__name__}'s noise table may not be the model's",
            stacklevel=2,
        )
    if alphas_cumprod is not None:
        given = as_alphas_cumprod(alphas_cumprod)
        if given.numel() != abar.numel() or not torch.equal(given, abar):
            msg = f"the alphas_cumprod passed differ from {type(scheduler).__name__}'s own table"
            if not allow_other_model:
                raise StridelabError(msg + "; pass allow_other_model=True to use the scheduler's table anyway")
            warnings.warn(msg, stacklevel=2)

    if getattr(scheduler, "_shift", None) != schedule.model_shift:  # a StrideDDIMScheduler built with it runs it
        warn_if_shift_dropped(schedule, type(scheduler).__name__)
    mismatch = solver_mismatch(scheduler, schedule)
    if mismatch is not None:
        warnings.warn(mismatch, stacklevel=2)
    cfg = scheduler.config
    if name == "DPMSolverMultistepScheduler" and cfg.get("final_sigmas_type", "zero") != "zero":
        warnings.warn(
            f"DPMSolverMultistepScheduler(final_sigmas_type={cfg.final_sigmas_type!r}) ends at sigma(t=0), not at "
            "clean data (abar = 1) as stridelab's DDIM and the tuned schedule do; use final_sigmas_type='zero'",
            stacklevel=2,
        )
    if name == "EulerDiscreteScheduler" and cfg.get("timestep_spacing") in ("linspace", "trailing"):
        # diffusers then sets init_noise_sigma = sigma_max instead of sqrt(sigma_max^2 + 1): x_T is scaled
        # by sigma / sqrt(sigma^2 + 1) too little, negligible only where sigma_max is large.
        s_max = float(schedule.sigmas(abar)[0])
        shrink = 1 - s_max / math.sqrt(s_max**2 + 1)
        if shrink > 1e-3:
            warnings.warn(
                f"EulerDiscreteScheduler(timestep_spacing={cfg.timestep_spacing!r}) scales the initial noise by "
                f"sigma_max = {s_max:.4g}, not sqrt(sigma_max^2 + 1) ({shrink:.2%} too small for this schedule); "
                "create it with timestep_spacing='leading' (unused otherwise when sigmas= is given)",
                stacklevel=2,
            )
    set_schedule(scheduler, name, schedule, device)
    return scheduler


def set_schedule(scheduler: Any, name: str, schedule: Schedule, device: str | torch.device | None = None) -> None:
    """Set `schedule` on `scheduler` (a `SUPPORTED_SCHEDULERS` `name`) the way `SUPPORTED_SCHEDULERS` says,
    with the class's own ``set_timesteps`` (an instance's may be pinned to this very call,
    `pipeline.interop.pipelines`). No checks: `apply_schedule` makes them first."""
    set_timesteps = type(scheduler).set_timesteps
    try:
        if SUPPORTED_SCHEDULERS[name] == "sigmas":
            abar = as_alphas_cumprod(scheduler.alphas_cumprod)
            set_timesteps(scheduler, sigmas=schedule.sigmas(abar).tolist(), device=device)
        elif SUPPORTED_SCHEDULERS[name] == "assigned":
            _assign_schedule(scheduler, schedule, device)
        else:
            set_timesteps(scheduler, timesteps=list(schedule.timesteps), device=device)
    except ValueError as e:  # diffusers' config conflicts (use_karras_sigmas=True, ...), one line
        if isinstance(e, StridelabError):
            raise
        raise StridelabError(f"{type(scheduler).__name__} refused the schedule: {e}") from None


def _assign_schedule(scheduler: Any, schedule: Schedule, device: str | torch.device | None) -> None:
    """UniPC: ``set_timesteps(n)`` (resets the multistep state), then the timesteps and the sigmas its own
    ``set_timesteps`` computes at integer timesteps (the float32 table value, then 0 or sigma(t=0))."""
    cfg = scheduler.config
    fixed = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas",
                         "use_dynamic_shifting") if cfg.get(k)]
    if fixed or getattr(scheduler, "solver_p", None) is not None:
        what = f"{fixed[0]}=True" if fixed else "a solver_p"
        raise StridelabError(f"{type(scheduler).__name__} with {what} places its own steps; create it without")
    type(scheduler).set_timesteps(scheduler, schedule.nfe, device=device)
    ac = scheduler.alphas_cumprod
    table = (((1 - ac) / ac) ** 0.5).numpy()
    last = 0.0 if cfg.get("final_sigmas_type", "zero") == "zero" else float(table[0])
    sigmas = np.concatenate([table[list(schedule.timesteps)], [last]]).astype(np.float32)
    scheduler.sigmas = torch.from_numpy(sigmas)
    scheduler.timesteps = torch.tensor(schedule.timesteps, dtype=torch.int64, device=device)
    scheduler.num_inference_steps = schedule.nfe


def timesteps_for_pipeline(schedule: Schedule) -> list[int]:
    """The schedule as ``pipe(..., timesteps=...)`` takes it (diffusers' ``retrieve_timesteps``): plain ints.

    For schedulers that take ``timesteps=`` (`SUPPORTED_SCHEDULERS`); check the model first with
    `check_compatible(schedule, pipe.scheduler.alphas_cumprod)`.
    """
    return [int(t) for t in schedule.timesteps]


def sigmas_for_pipeline(
    schedule: Schedule, alphas_cumprod: torch.Tensor | Sequence[float], *, allow_other_model: bool = False
) -> list[float]:
    """The schedule as ``pipe(..., sigmas=...)`` takes it for ``EulerDiscreteScheduler``: n + 1 floats ending in 0.

    EulerDiscrete uses a ``sigmas=`` list verbatim (its ``final_sigmas_type`` is ignored then) and runs
    ``len(sigmas) - 1`` steps, so the trailing 0 (the final jump to clean data) must be included.
    """
    abar = check_compatible(schedule, alphas_cumprod, allow_other_model=allow_other_model)
    return [float(s) for s in schedule.sigmas(abar)]

