"""Drive a diffusers pipeline with a schedule, and prove it ran that schedule: `sample_with_schedule`.

A pipeline calls ``scheduler.set_timesteps`` itself, so configuring its scheduler beforehand is not enough:
``DDPMPipeline(num_inference_steps=10)`` re-spaces the steps evenly (900, 800, ..., 0) and takes no
``timesteps=``. `sample_with_schedule` therefore

1. builds the scheduler the schedule records (`scheduler_for_schedule`, on the pipeline's own config);
2. hands it the schedule the way this pipeline can take it: ``StrideDDIMScheduler`` holds it in its config
   (``num_inference_steps=n``); otherwise ``sigmas=`` / ``timesteps=`` where the pipeline's ``__call__``
   takes them (`SUPPORTED_SCHEDULERS` says which the scheduler takes); otherwise (``DDPMPipeline``,
   ``DDIMPipeline``, UniPC) the scheduler's ``set_timesteps(n)`` is pinned to the schedule for this call;
3. records every timestep the network is called with (a forward pre-hook) and raises at the first one that is
   not the schedule's (Heun: 2n - 1 evaluations, t_0 once, every later t twice), or when the run ends short;
4. puts the pipeline's own scheduler back, whatever happened.

A sigma-space scheduler (``init_noise_sigma`` != 1: Euler, Heun) also needs the pipeline to scale x_T by
``init_noise_sigma`` and call ``scale_model_input`` before every model call; ``DDPMPipeline`` and
``DDIMPipeline`` do neither, so those runs are refused at the first model call (their samples would be
wrong), naming the way out. Keyword arguments a pipeline passes to ``step`` that the scheduler does not take
(``DDPMPipeline``'s ``generator=``, ``DDIMPipeline``'s ``eta=0``) are dropped when they cannot matter.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch

from pipeline.core.schedules import Schedule
from pipeline.errors import StridelabError
from pipeline.interop.ddim_scheduler import shifted_model_levels
from pipeline.interop.apply import SUPPORTED_SCHEDULERS, set_schedule, sigmas_for_pipeline, supported_name
from pipeline.interop.reuse import recorded_solver, scheduler_for_schedule, solver_record
from pipeline.solvers.registry import DEFAULT_SOLVER

TIMESTEP_TOLERANCE = 1e-3
"""How far a visited timestep may be from the schedule's: sigma-space schedulers map sigmas back to t
(measured exact at n = 3 .. 30 on linear betas; the margin absorbs float32 rounding elsewhere)."""

NETWORKS: tuple[str, ...] = ("unet", "transformer", "prior")
"""Pipeline attributes that hold the network whose calls are checked (the first one present)."""

_STEP_KWARGS_THAT_CANNOT_MATTER: Mapping[str, Callable[[Any], bool]] = {
    "generator": lambda v: True,  # only a stochastic step draws noise; a step without the argument draws none
    "eta": lambda v: not v,
    "use_clipped_model_output": lambda v: not v,
}


def evaluation_timesteps(scheduler_name: str, schedule: Schedule) -> list[int]:
    """The timesteps, in order, at which `scheduler_name` evaluates the model on `schedule`.

    ``HeunDiscreteScheduler``: t_0, then every later t_i twice (corrector, then the next predictor) = 2n - 1;
    every other supported scheduler: the schedule itself (n).
    """
    ts = [int(t) for t in schedule.timesteps]
    if scheduler_name == "HeunDiscreteScheduler":
        return ts[:1] + [t for t in ts[1:] for _ in range(2)]
    return ts


def _first_timestep(args: tuple, kwargs: Mapping[str, Any]) -> float | None:
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if isinstance(t, torch.Tensor):
        return float(t.reshape(-1)[0]) if t.numel() else None
    return None if t is None else float(t)


def _network(pipe: Any) -> torch.nn.Module:
    for name in NETWORKS:
        net = getattr(pipe, name, None)
        if isinstance(net, torch.nn.Module):
            return net
    raise StridelabError(f"{type(pipe).__name__} has none of {', '.join(NETWORKS)} to check the visited timesteps on")


class _Watch:
    """Counts the network's calls and ``scale_model_input`` calls; raises at the first off-schedule call."""

    def __init__(self, pipe: Any, scheduler: Any, expected: list[float], schedule: Schedule):
        self.pipe, self.scheduler, self.expected, self.schedule = pipe, scheduler, expected, schedule
        self.visited: list[float] = []
        self.scaled = 0

    def scale_model_input(self, *args: Any, **kwargs: Any) -> Any:
        self.scaled += 1
        return type(self.scheduler).scale_model_input(self.scheduler, *args, **kwargs)

    def before_network(self, module: Any, args: tuple, kwargs: dict) -> None:
        t = _first_timestep(args, kwargs)
        k = len(self.visited)
        self.visited.append(t)
        pipe, cls = type(self.pipe).__name__, type(self.scheduler).__name__
        sigma0 = float(self.scheduler.init_noise_sigma)
        if sigma0 != 1.0 and self.scaled <= k:
            raise StridelabError(
                f"{pipe} does not call scheduler.scale_model_input (nor scale x_T by init_noise_sigma = {sigma0:.4g}), "
                f"which {cls} needs: its samples would be wrong; run solver "
                f"{(recorded_solver(self.schedule) or {}).get('name', '?')!r} in a pipeline that does "
                "(e.g. StableDiffusionPipeline) or with k-diffusion (k_diffusion_sigmas)"
            )
        if k >= len(self.expected) or t is None or abs(t - self.expected[k]) > TIMESTEP_TOLERANCE:
            want = self.expected[k] if k < len(self.expected) else "no further call"
            raise StridelabError(
                f"{pipe} called the model at timestep {t} (call {k + 1}), but schedule {self.schedule.name!r} "
                f"with {cls} evaluates at {want} there (all: {self.expected}): the pipeline runs other steps"
            )

    def check_complete(self) -> None:
        if len(self.visited) != len(self.expected):
            raise StridelabError(
                f"{type(self.pipe).__name__} called the model {len(self.visited)} times, schedule "
                f"{self.schedule.name!r} with {type(self.scheduler).__name__} needs {len(self.expected)} "
                f"({self.expected}); visited {self.visited}"
            )


def _tolerant_step(scheduler: Any) -> Callable[..., Any]:
    """``step`` that drops the pipeline's keyword arguments this scheduler does not take, where they cannot
    matter (`_STEP_KWARGS_THAT_CANNOT_MATTER`); any other one raises."""
    step = type(scheduler).step
    takes = inspect.signature(step).parameters

    def tolerant(*args: Any, **kwargs: Any) -> Any:
        for k in [k for k in kwargs if k not in takes]:
            harmless = _STEP_KWARGS_THAT_CANNOT_MATTER.get(k)
            if harmless is None or not harmless(kwargs[k]):
                raise StridelabError(f"the pipeline passes {k}={kwargs[k]!r} to {type(scheduler).__name__}.step, "
                                     "which does not take it")
            del kwargs[k]
        return step(scheduler, *args, **kwargs)

    return tolerant


def _pinned_set_timesteps(scheduler: Any, name: str, schedule: Schedule) -> Callable[..., None]:
    """``set_timesteps`` that always sets `schedule` (a pipeline's own step count must be the schedule's)."""

    def pinned(num_inference_steps: int | None = None, device: str | torch.device | None = None, **kwargs: Any) -> None:
        given = {k: v for k, v in kwargs.items() if v is not None and k in ("timesteps", "sigmas")}
        if given or num_inference_steps not in (None, schedule.nfe):
            raise StridelabError(
                f"the pipeline asked {name} for {num_inference_steps} steps {given or ''}, but it is pinned to "
                f"schedule {schedule.name!r} ({schedule.nfe} steps)"
            )
        set_schedule(scheduler, name, schedule, device)

    return pinned


def sample_with_schedule(
    pipe: Any,
    schedule: Schedule,
    *,
    allow_other_model: bool = False,
    scheduler_config: Mapping[str, Any] | None = None,
    **pipe_kwargs: Any,
) -> Any:
    """Run ``pipe(**pipe_kwargs)`` on exactly `schedule`, with the solver it records; return the pipeline's output.

    Example::

        images = sample_with_schedule(pipe, Schedule.load("schedule.json"), generator=torch.manual_seed(0)).images

    Args:
        pipe: a diffusers pipeline (``pipe.scheduler`` supplies the model's betas, T and prediction type;
            ``pipe.unet`` / ``pipe.transformer`` is the network whose calls are checked). Left as it was.
        schedule: normally an export (``Schedule.load``): its ``meta["solver"]`` picks the scheduler (none
            recorded: DDIM, i.e. ``StrideDDIMScheduler``).
        allow_other_model: as for `apply_schedule` (warn, not raise, on another alphas_cumprod).
        scheduler_config: more scheduler config (`scheduler_for_schedule`'s overrides). For
            ``StrideDDIMScheduler``, ``clip_sample`` and ``thresholding`` default to False: stridelab's DDIM,
            on which the schedule was tuned, never clips x0, even where the checkpoint's config (google/ddpm-*)
            says so.
        pipe_kwargs: the pipeline's own arguments (``generator``, ``batch_size``, a prompt, ...); not
            ``num_inference_steps``, ``timesteps`` or ``sigmas``: the schedule sets them.
    Raises:
        StridelabError: a step argument given, a schedule that does not fit the model or has no diffusers
            scheduler, a sigma-space solver in a pipeline that does not scale for it, or any model call at a
            timestep that is not the schedule's (raised at that call), or too few calls.
    """
    for k in ("num_inference_steps", "timesteps", "sigmas"):
        if k in pipe_kwargs:
            raise StridelabError(f"`{k}` is set by the schedule ({schedule.nfe} steps); do not pass it")
    rec = recorded_solver(schedule) or solver_record(DEFAULT_SOLVER)
    overrides = dict(scheduler_config or {})
    if rec.get("diffusers_class") == "StrideDDIMScheduler":
        overrides = {"clip_sample": False, "thresholding": False, **overrides}
    scheduler = scheduler_for_schedule(schedule, pipe.scheduler, allow_other_model=allow_other_model, **overrides)
    name = supported_name(scheduler)
    takes = inspect.signature(type(pipe).__call__).parameters
    how = SUPPORTED_SCHEDULERS[name]
    kwargs = dict(pipe_kwargs)
    if name != "StrideDDIMScheduler" and how == "sigmas" and "sigmas" in takes:
        kwargs["sigmas"] = sigmas_for_pipeline(schedule, scheduler.alphas_cumprod, allow_other_model=allow_other_model)
    elif name != "StrideDDIMScheduler" and how == "timesteps" and "timesteps" in takes:
        kwargs["timesteps"] = [int(t) for t in schedule.timesteps]
    else:
        if name != "StrideDDIMScheduler":  # the stride scheduler holds the schedule in its config already
            scheduler.set_timesteps = _pinned_set_timesteps(scheduler, name, schedule)
        if "num_inference_steps" in takes:
            kwargs["num_inference_steps"] = schedule.nfe
    expected: list[float] = list(evaluation_timesteps(name, schedule))
    if schedule.model_shift is not None and name == "StrideDDIMScheduler":
        # the network is asked at the shifted, fractional timesteps (any other scheduler warned that it drops them)
        t_model, _ = shifted_model_levels(schedule.timesteps, schedule.model_shift, scheduler.alphas_cumprod)
        expected = [float(v) for v in t_model.to(torch.float32)]
    watch = _Watch(pipe, scheduler, expected, schedule)
    scheduler.scale_model_input = watch.scale_model_input
    scheduler.step = _tolerant_step(scheduler)
    own = pipe.scheduler
    hook = _network(pipe).register_forward_pre_hook(watch.before_network, with_kwargs=True)
    try:
        pipe.scheduler = scheduler  # after __init__: DDIMPipeline converts schedulers only there
        out = pipe(**kwargs)
    finally:
        hook.remove()
        pipe.scheduler = own
    watch.check_complete()
    return out
