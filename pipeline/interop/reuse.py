"""Which solver a schedule was tuned with, and building exactly that diffusers scheduler again.

Exports record the solver (``meta["solver"]``, `pipeline.solvers.base.SolverSpec.record`: class, config,
k-diffusion and ComfyUI names). `solver_mismatch` says in one line when a scheduler runs another update
(`pipeline.interop.apply.apply_schedule` warns with it); `scheduler_for_schedule` is the one-call reuse
path for diffusers users.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from pipeline.core.schedules import Schedule
from pipeline.errors import StridelabError
from pipeline.solvers.registry import DEFAULT_SOLVER, get_solver

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


def scheduler_class(cls_name: str) -> type:
    """The scheduler class of a solver record: `StrideDDIMScheduler` or a diffusers class by name."""
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
    cls = scheduler_class(cls_name)
    # diffusers lists the keys an in-memory scheduler left at its class defaults in `_use_default_values`, and
    # from_config then takes the *new* class's defaults for them (HeunDiscrete: other betas); the model's values
    # are what the schedule was tuned on, so drop the list.
    config = {k: v for k, v in dict(base.config if hasattr(base, "config") else base).items() if k != "_use_default_values"}
    extra = {"schedule_timesteps": list(schedule.timesteps)} if cls_name == "StrideDDIMScheduler" else {}
    if extra and schedule.model_shift is not None:
        extra["model_log_sigma_shift"] = list(schedule.model_shift)
    sched = cls.from_config(config, **{**rec["diffusers_config"], **extra, **overrides})
    from pipeline.interop.apply import apply_schedule  # apply imports this module for its warning

    return apply_schedule(sched, schedule, alphas_cumprod, device=device, allow_other_model=allow_other_model)


