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
`apply_schedule` warns when the scheduler it configures runs another update, and
`scheduler_for_schedule` builds exactly the recorded scheduler from a pipeline's config.

Elsewhere: `k_diffusion_sigmas` (n + 1 sigmas ending in 0, for ``k_diffusion.sampling.sample_*``),
`schedule_from_sigmas` (back), `comfyui_sigma_string` (ComfyUI's ManualSigmas input, and
`parse_sigma_string` back), `to_plain_json` (timesteps, sigmas and abar at each step, the solver).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from pipeline.errors import StridelabError
from pipeline.core.noise import as_alphas_cumprod, t_from_sigma
from pipeline.core.schedules import Schedule, project_to_distinct
from pipeline.solvers.registry import DEFAULT_SOLVER, get_solver

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

SOLVER_KEYS: tuple[str, ...] = (
    "algorithm_type", "solver_order", "solver_type", "predict_x0", "final_sigmas_type", "lower_order_final",
)
"""Config keys that select the update inside a diffusers scheduler class (shown in the mismatch warning)."""

SAME_UPDATE: tuple[tuple[tuple[str, Mapping[str, Any]], ...], ...] = (
    (("StrideDDIMScheduler", {}), ("EulerDiscreteScheduler", {}),
     ("DPMSolverMultistepScheduler", {"solver_order": 1, "algorithm_type": "dpmsolver++", "final_sigmas_type": "zero"})),
)
"""Schedulers (class, config they need) that run one update on the same steps: DDIM = Euler on the PF-ODE
= DPM-Solver++ 1 (measured equal, the table above); reusing a schedule across them does not warn."""

PLAIN_JSON_FORMAT = "stridelab.schedule.plain/1"


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


def _supported_name(scheduler: Any) -> str | None:
    for cls in type(scheduler).__mro__:
        if cls.__name__ in SUPPORTED_SCHEDULERS:
            return cls.__name__
    return None


def _unsupported(scheduler: Any) -> StridelabError:
    name = type(scheduler).__name__
    why = ""
    if name == "DDIMScheduler":
        why = (" (its set_timesteps takes no timesteps= and its step assumes even spacing, t - T // N; use "
               "pipeline.interop.ddim_scheduler.StrideDDIMScheduler.from_config(scheduler.config) instead)")
    return StridelabError(
        f"{name} cannot run a custom timestep schedule{why}; schedulers that can: "
        f"{', '.join(SUPPORTED_SCHEDULERS)}"
    )


def model_evaluations(scheduler: Any, nfe: int) -> int:
    """Network evaluations `scheduler` spends on an `nfe`-step schedule (Heun: 2 nfe - 1, others: nfe)."""
    name = _supported_name(scheduler)
    if name is None:
        raise _unsupported(scheduler)
    return 2 * nfe - 1 if name == "HeunDiscreteScheduler" else nfe


# --------------------------------------------------------------------------------------------------
# The solver a schedule was tuned with


def solver_record(solver: str | Mapping[str, Any]) -> dict[str, Any]:
    """A solver record as exports store it: `SolverSpec.record` of a registered name, or a stored record
    (from a file) checked for shape and returned as it is: the file says what it was tuned with.

    Raises:
        StridelabError: an unknown name, or a record without a string ``name`` / with a non-object
            ``diffusers_config``.
    """
    if isinstance(solver, str):
        return get_solver(solver).record()
    if not isinstance(solver, Mapping) or not isinstance(solver.get("name"), str):
        raise StridelabError(f"a solver record must be a JSON object with a string 'name', got {solver!r}")
    cfg = solver.get("diffusers_config") or {}
    if not isinstance(cfg, Mapping):
        raise StridelabError(f"solver {solver['name']!r}: 'diffusers_config' must be a JSON object, got {cfg!r}")
    return {**dict(solver), "diffusers_config": dict(cfg)}


def recorded_solver(schedule: Schedule) -> dict[str, Any] | None:
    """The solver record in ``schedule.meta["solver"]`` (exports carry one), or None for older files."""
    rec = schedule.meta.get("solver")
    return None if rec is None else solver_record(rec)


def _call(cls_name: str, config: Mapping[str, Any]) -> str:
    return f"{cls_name}({', '.join(f'{k}={v!r}' for k, v in sorted(config.items()))})"


def _is_class(scheduler: Any, cls_name: str | None) -> bool:
    return cls_name is not None and any(c.__name__ == cls_name for c in type(scheduler).__mro__)


def _has_config(scheduler: Any, config: Mapping[str, Any]) -> bool:
    missing = object()
    return all(scheduler.config.get(k, missing) == v for k, v in config.items())


def _same_update(record: Mapping[str, Any], scheduler: Any) -> bool:
    want = (record.get("diffusers_class"), record["diffusers_config"])
    for group in SAME_UPDATE:
        tuned = any(want[0] == c and all(want[1].get(k) == v for k, v in cfg.items()) for c, cfg in group)
        if tuned and any(_is_class(scheduler, c) and _has_config(scheduler, cfg) for c, cfg in group):
            return True
    return False


def solver_mismatch(scheduler: Any, schedule: Schedule) -> str | None:
    """One line when `scheduler` does not run the solver `schedule` records; None when it does or none is recorded.

    It runs it when it is the recorded diffusers class (or a subclass) with every key of the recorded
    config equal, or one of the same `SAME_UPDATE` group.
    """
    rec = recorded_solver(schedule)
    if rec is None:
        return None
    want_cls, want_cfg = rec.get("diffusers_class"), rec["diffusers_config"]
    if (_is_class(scheduler, want_cls) and _has_config(scheduler, want_cfg)) or _same_update(rec, scheduler):
        return None
    keys = [k for k in (*want_cfg, *SOLVER_KEYS) if k in scheduler.config]
    running = _call(type(scheduler).__name__, {k: scheduler.config[k] for k in dict.fromkeys(keys)})
    tuned = _call(want_cls, want_cfg) if want_cls else "no diffusers scheduler"
    return (f"schedule {schedule.name!r} was tuned for {rec['name']} ({tuned}), running {running}: results may be "
            "worse (a DDIM-tuned schedule measured 1.95x worse recon in DPM-Solver++ 2M); "
            "scheduler_for_schedule builds the recorded one")


def _scheduler_class(cls_name: str) -> type:
    if cls_name == "StrideDDIMScheduler":
        from pipeline.interop.ddim_scheduler import StrideDDIMScheduler

        return StrideDDIMScheduler
    import diffusers

    cls = getattr(diffusers, cls_name, None)
    if not isinstance(cls, type):
        raise StridelabError(f"diffusers {diffusers.__version__} has no scheduler class {cls_name!r}")
    return cls


def scheduler_for_schedule(
    schedule: Schedule,
    base: Any,
    alphas_cumprod: torch.Tensor | Sequence[float] | None = None,
    *,
    device: str | torch.device | None = None,
    allow_other_model: bool = False,
    **overrides: Any,
) -> Any:
    """The diffusers scheduler the schedule was tuned with, built on a model's config and set to the schedule.

    ``Cls.from_config(config, **recorded_config, **overrides)`` for the recorded solver (`recorded_solver`;
    a schedule recording none, as files from before solvers were recorded, is DDIM's), then
    `apply_schedule`. The one-call reuse path::

        pipe.scheduler = scheduler_for_schedule(Schedule.load("schedule.json"), pipe.scheduler)

    Args:
        schedule: the schedule, normally an export.
        base: the model's scheduler, or its config (``pipe.scheduler.config``): supplies the betas, T and
            prediction type.
        alphas_cumprod, device, allow_other_model: as for `apply_schedule`.
        overrides: more config on top (e.g. ``clip_sample=False`` for `StrideDDIMScheduler` on a DDPM
            config that clips); one that changes a recorded key gets `apply_schedule`'s warning.
    Returns:
        A new scheduler, configured (for `StrideDDIMScheduler` the schedule is also in its config, so
        pipelines that only call ``set_timesteps(num_inference_steps)`` run it).
    Raises:
        StridelabError: the recorded solver has no diffusers scheduler (naming its k-diffusion and ComfyUI
            samplers instead), or any error of `apply_schedule`.
    """
    rec = recorded_solver(schedule) or solver_record(DEFAULT_SOLVER)
    cls_name = rec.get("diffusers_class")
    if cls_name is None:
        ways = (("k-diffusion", "k_diffusion", "k_diffusion_sigmas"), ("ComfyUI", "comfyui", "comfyui_sigma_string"))
        elsewhere = [f"{tool}'s {rec[key]} (sigmas: {fn})" for tool, key, fn in ways if rec.get(key)]
        raise StridelabError(
            f"solver {rec['name']!r}, which schedule {schedule.name!r} was tuned with, has no diffusers scheduler; "
            f"run it with {' or '.join(elsewhere) or 'stridelab itself (pipeline.solvers.registry.solve)'}"
        )
    cls = _scheduler_class(cls_name)
    config = dict(base.config if hasattr(base, "config") else base)
    extra = {"schedule_timesteps": list(schedule.timesteps)} if cls_name == "StrideDDIMScheduler" else {}
    sched = cls.from_config(config, **{**rec["diffusers_config"], **extra, **overrides})
    return apply_schedule(sched, schedule, alphas_cumprod, device=device, allow_other_model=allow_other_model)


def apply_schedule(
    scheduler: Any,
    schedule: Schedule,
    alphas_cumprod: torch.Tensor | Sequence[float] | None = None,
    *,
    device: str | torch.device | None = None,
    allow_other_model: bool = False,
) -> Any:
    """Configure a diffusers scheduler instance to run `schedule` (calls its ``set_timesteps``).

    Then drive it as usual (``for t in scheduler.timesteps: ... scheduler.step(...)``), or hand the
    schedule to a pipeline with ``pipe(..., timesteps=timesteps_for_pipeline(s))`` /
    ``sigmas=sigmas_for_pipeline(s, abar)`` (pipelines call ``set_timesteps`` themselves).

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
    name = _supported_name(scheduler)
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
    try:
        if SUPPORTED_SCHEDULERS[name] == "sigmas":
            scheduler.set_timesteps(sigmas=schedule.sigmas(abar).tolist(), device=device)
        elif SUPPORTED_SCHEDULERS[name] == "assigned":
            _assign_schedule(scheduler, schedule, device)
        else:
            scheduler.set_timesteps(timesteps=list(schedule.timesteps), device=device)
    except ValueError as e:  # diffusers' config conflicts (use_karras_sigmas=True, ...), one line
        if isinstance(e, StridelabError):
            raise
        raise StridelabError(f"{type(scheduler).__name__} refused the schedule: {e}") from None
    return scheduler


def _assign_schedule(scheduler: Any, schedule: Schedule, device: str | torch.device | None) -> None:
    """UniPC: ``set_timesteps(n)`` (resets the multistep state), then the timesteps and the sigmas its own
    ``set_timesteps`` computes at integer timesteps (the float32 table value, then 0 or sigma(t=0))."""
    cfg = scheduler.config
    fixed = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas",
                         "use_dynamic_shifting") if cfg.get(k)]
    if fixed or getattr(scheduler, "solver_p", None) is not None:
        what = f"{fixed[0]}=True" if fixed else "a solver_p"
        raise StridelabError(f"{type(scheduler).__name__} with {what} places its own steps; create it without")
    scheduler.set_timesteps(schedule.nfe, device=device)
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


# --------------------------------------------------------------------------------------------------
# k-diffusion and plain JSON


def k_diffusion_sigmas(
    schedule: Schedule,
    alphas_cumprod: torch.Tensor | Sequence[float],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    allow_other_model: bool = False,
) -> torch.Tensor:
    """sigma_i = sqrt((1 - abar_{t_i}) / abar_{t_i}) and a trailing 0: shape [n + 1], decreasing.

    What ``k_diffusion.sampling.sample_euler(model, x, sigmas)`` (and its siblings) take, float32 like
    ``get_sigmas_karras``; computed in float64 first. Start from ``x = randn * sigmas[0]`` (VE scaling).
    """
    abar = check_compatible(schedule, alphas_cumprod, allow_other_model=allow_other_model)
    return schedule.sigmas(abar).to(device=device, dtype=dtype)


def _as_float64(values: torch.Tensor | Sequence[float]) -> torch.Tensor:
    # A list goes straight to float64 (torch.as_tensor would round it to float32 first).
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", torch.float64).reshape(-1)
    return torch.as_tensor(values, dtype=torch.float64).reshape(-1)


def _checked_sigmas(sigmas: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """float64 sigmas without a trailing 0, or a `StridelabError` (empty, not finite, <= 0, not decreasing)."""
    s = _as_float64(sigmas)
    if s.numel() and s[-1] == 0:
        s = s[:-1]
    if s.numel() == 0:
        raise StridelabError("sigmas is empty (apart from a trailing 0)")
    if not torch.isfinite(s).all() or (s <= 0).any():
        raise StridelabError("sigmas must be finite and > 0 (only the last may be 0)")
    if not (s[1:] < s[:-1]).all():
        i = int(torch.nonzero(s[1:] >= s[:-1])[0, 0]) + 1
        raise StridelabError(f"sigmas[{i}] = {s[i].item():.6g} is not below sigmas[{i - 1}] = {s[i - 1].item():.6g}: "
                             "sigmas must be strictly decreasing")
    return s


def schedule_from_sigmas(
    sigmas: torch.Tensor | Sequence[float],
    alphas_cumprod: torch.Tensor | Sequence[float],
    *,
    name: str = "from_sigmas",
) -> Schedule:
    """Inverse of `k_diffusion_sigmas`: the integer-timestep schedule nearest to a sigma list.

    Each sigma is mapped to a fractional timestep by log-sigma interpolation over the model's table
    (`pipeline.core.noise.t_from_sigma`, as k-diffusion's ``DiscreteSchedule``) and rounded to distinct
    integers (`pipeline.core.schedules.project_to_distinct`). A trailing 0 is dropped. The round trip is exact
    for schedules of integer timesteps, in float32 or float64.

    Raises:
        StridelabError: sigmas not finite, not positive, or not strictly decreasing.
    """
    s = _checked_sigmas(sigmas)
    abar = as_alphas_cumprod(alphas_cumprod)
    table = ((1 - abar) / abar).sqrt()
    lo, hi = float(table[0]), float(table[-1])
    # 1e-4 relative slack: float32 sigma formulas (k-diffusion's karras ramp) land just past the table's ends.
    outside = [float(v) for v in s if not lo * (1 - 1e-4) <= float(v) <= hi * (1 + 1e-4)]
    if outside:
        warnings.warn(
            f"{len(outside)} sigma(s) outside the model's range [{lo:.4g}, {hi:.4g}] (e.g. {outside[0]:.4g}) "
            "were clamped to its first/last timestep",
            stacklevel=2,
        )
    t = t_from_sigma(s, abar).numpy()
    T = abar.numel()
    return Schedule(project_to_distinct(t, T), T, name, {"sigmas": [float(v) for v in s]})


def comfyui_sigma_string(sigmas: torch.Tensor | Sequence[float]) -> str:
    """n + 1 sigmas ending in 0 as ComfyUI's ManualSigmas node takes them (feeding SamplerCustom's SIGMAS):
    comma-separated decimals, no exponents, each the shortest that reads back as the same float64.

    Raises:
        StridelabError: not a strictly decreasing list of finite positive sigmas ending in 0.
    """
    s = _as_float64(sigmas)
    if s.numel() < 2 or s[-1] != 0:
        raise StridelabError(f"ComfyUI sigmas are n + 1 values ending in 0 (the step to clean data), got {s.tolist()}")
    _checked_sigmas(s)
    return ", ".join(np.format_float_positional(v, unique=True, trim="-") for v in s.numpy())


def parse_sigma_string(text: str) -> list[float]:
    """The floats of a comma-separated sigma string (`comfyui_sigma_string`'s output; spaces are free).

    Raises:
        StridelabError: an entry that is not a number.
    """
    out = []
    for i, part in enumerate(str(text).split(",")):
        try:
            out.append(float(part))
        except ValueError:
            raise StridelabError(f"sigma string entry {i} is {part.strip()!r}, not a number") from None
    return out


def to_plain_json(
    schedule: Schedule, alphas_cumprod: torch.Tensor | Sequence[float], *, allow_other_model: bool = False
) -> dict[str, Any]:
    """A self-contained JSON object any tool can read, with the noise level of every step spelled out.

    Keys: ``format``, ``name``, ``nfe``, ``num_train_timesteps``, ``timesteps`` (descending ints),
    ``alphas_cumprod`` (abar at those timesteps), ``sigmas`` (sqrt((1 - abar) / abar), n + 1 values ending
    in 0), ``alphas_cumprod_sha256`` (fingerprint of the whole table), ``conventions`` (one line each) and,
    when the schedule records one, ``solver`` (`SolverSpec.record`: the solver it was tuned with and its
    diffusers / k-diffusion / ComfyUI twins). ``Schedule.from_dict`` reads it back, fingerprint and solver in
    ``meta``.
    """
    abar = check_compatible(schedule, alphas_cumprod, allow_other_model=allow_other_model)
    ts = [int(t) for t in schedule.timesteps]
    return {
        "format": PLAIN_JSON_FORMAT,
        "name": schedule.name,
        "nfe": schedule.nfe,
        "num_train_timesteps": schedule.num_train_timesteps,
        "timesteps": ts,
        "alphas_cumprod": [float(abar[t]) for t in ts],
        "sigmas": [float(v) for v in schedule.sigmas(abar)],
        "alphas_cumprod_sha256": alphas_cumprod_sha256(abar),
        **({"solver": rec} if (rec := recorded_solver(schedule)) is not None else {}),
        "conventions": {
            "timesteps": "integer indices into the model's training noise schedule, noisiest first",
            "alphas_cumprod": "abar_t = prod_{s<=t}(1 - beta_s); x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps",
            "sigmas": "sqrt((1 - abar) / abar) at each timestep, then 0: the step after the last goes to clean data",
        },
    }
