"""Each registry solver's diffusers twin, run over the same explicit timestep list (tests, benchmarks).

`twin_scheduler` builds the scheduler a user runs downstream: the class `SolverSpec.diffusers_class` names,
the model's own table (``trained_betas``) and exactly `SolverSpec.diffusers_config`, and checks its
float32 abar against the model's (`pipeline.interop.defaults.diffusers_twin`).
`configure_twin` passes the list as diffusers 0.42 allows:

=================================  =========================================================================
scheduler                          how the list goes in
=================================  =========================================================================
``EulerDiscreteScheduler``         ``set_timesteps(sigmas=[sigma(t_0), ..., sigma(t_{n-1}), 0])``; it recovers
                                   t by interpolating log sigma (within ~1e-4 of the integers; rounded)
``HeunDiscreteScheduler``          ``set_timesteps(timesteps=...)`` (each corrector t listed twice: 2n - 1)
``DPMSolverMultistepScheduler``    ``set_timesteps(timesteps=...)``
``UniPCMultistepScheduler``        no VP argument: its ``sigmas=`` requires ``use_flow_sigmas=True``.
                                   ``route="state"``: ``set_timesteps(n)``, then ``timesteps`` and ``sigmas``
                                   written as its VP branch would compute them for the list. ``route="flow"``:
                                   ``use_flow_sigmas=True`` and ``sigmas=`` s = sigma_vp / (alpha + sigma_vp),
                                   the same lambdas; its state is x / (alpha + sigma_vp) and its timesteps
                                   are int(s T), so the model gets our t and the input rescaled.
=================================  =========================================================================

`scheduler_loop` is the loop every diffusers pipeline runs, with two extensions: the
k-th model call gets an explicit integer t (``model_timesteps[k]``), and the first model input is x_T itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from pipeline.core.noise import as_alphas_cumprod
from pipeline.errors import StridelabError
from pipeline.interop.defaults import diffusers_twin
from pipeline.solvers.base import SolverSpec


def twin_scheduler(spec: SolverSpec, alphas_cumprod: torch.Tensor, **extra: Any) -> Any:
    """A fresh ``spec.diffusers_class`` on the model's table with ``spec.diffusers_config`` (+ `extra`):
    `pipeline.interop.defaults.diffusers_twin`, refusing our own `StrideDDIMScheduler` (not a diffusers class).

    Raises:
        StridelabError: the solver has no diffusers twin, or the scheduler's rebuilt float32 abar is more
            than `TABLE_TOLERANCE` (relative) from the model's.
    """
    if spec.diffusers_class is None or spec.diffusers_class.startswith("Stride"):
        raise StridelabError(f"{spec.name} has no diffusers scheduler twin")
    return diffusers_twin(spec.name, alphas_cumprod, **extra)


def configure_twin(
    spec: SolverSpec, timesteps: Sequence[int], alphas_cumprod: torch.Tensor, *,
    route: Literal["state", "flow"] = "state",
) -> tuple[Any, list[int], list[float]]:
    """The twin scheduler set to `timesteps`, the integer t of each model call, and each call's input scale.

    Returns:
        (scheduler, model_timesteps [one per ``scheduler.timesteps`` entry], input_scale [same length]:
        the model input is ``scale_model_input(x, t) * input_scale[k]``).
    """
    abar = as_alphas_cumprod(alphas_cumprod)
    ts = [int(t) for t in timesteps]
    a = abar[ts]
    sigmas = ((1 - a) / a).sqrt().tolist()
    ones = [1.0] * len(ts)
    if spec.diffusers_class == "EulerDiscreteScheduler":
        sched = twin_scheduler(spec, abar)
        sched.set_timesteps(sigmas=sigmas + [0.0])
        return sched, ts, ones
    if spec.diffusers_class == "HeunDiscreteScheduler":
        sched = twin_scheduler(spec, abar)
        sched.set_timesteps(timesteps=ts)
        calls = [ts[0]] + [t for t in ts[1:] for _ in (0, 1)]
        return sched, calls, [1.0] * len(calls)
    if spec.diffusers_class == "DPMSolverMultistepScheduler":
        sched = twin_scheduler(spec, abar)
        sched.set_timesteps(timesteps=ts)
        return sched, ts, ones
    if spec.diffusers_class == "UniPCMultistepScheduler":
        return _configure_unipc(spec, ts, abar, route)
    raise StridelabError(f"no twin route for {spec.diffusers_class}")


def _configure_unipc(spec: SolverSpec, ts: list[int], abar: torch.Tensor, route: str):
    if route == "flow":
        sched = twin_scheduler(spec, abar, use_flow_sigmas=True)
        alpha, sigma_vp = abar[ts].sqrt(), (1 - abar[ts]).sqrt()
        # An array, not a list: 0.42 multiplies the argument by flow_shift before converting it.
        sched.set_timesteps(sigmas=(sigma_vp / (alpha + sigma_vp)).numpy())
        return sched, ts, (alpha + sigma_vp).tolist()
    sched = twin_scheduler(spec, abar)
    sched.set_timesteps(len(ts))
    # What the VP branch of set_timesteps computes for a list: sigma from its own float32 table, then 0.
    own = ((1 - sched.alphas_cumprod) / sched.alphas_cumprod) ** 0.5
    sched.sigmas = torch.cat([own[ts], torch.zeros(1)]).to(torch.float32)
    sched.timesteps = torch.tensor(ts, dtype=torch.int64)
    return sched, ts, [1.0] * len(ts)


@torch.no_grad()
def scheduler_loop(
    denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_T: torch.Tensor,
    scheduler: Any,
    model_timesteps: Sequence[int],
    input_scale: Sequence[float] | None = None,
) -> torch.Tensor:
    """The pipelines' loop (``scale_model_input`` -> model -> ``step``) from VP noise x_T [B, ...]; returns x_0.

    The state starts at x_T / (the first input scale), and the first model input is x_T exactly.
    """
    steps = scheduler.timesteps
    if len(model_timesteps) != len(steps):
        raise StridelabError(f"{len(model_timesteps)} model timesteps for {len(steps)} scheduler steps")
    scale = list(input_scale) if input_scale is not None else [1.0] * len(steps)
    c0 = float(scheduler.scale_model_input(x_T.new_ones(()), steps[0])) * scale[0]
    x = x_T / c0
    for k, t in enumerate(steps):
        x_in = x_T if k == 0 else scheduler.scale_model_input(x, t) * scale[k]
        t_batch = torch.full((x.shape[0],), int(model_timesteps[k]), dtype=torch.long, device=x.device)
        x = scheduler.step(denoiser(x_in, t_batch).to(x.dtype), t, x).prev_sample
    return x


def run_twin(
    spec: SolverSpec,
    denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_T: torch.Tensor,
    timesteps: Sequence[int],
    alphas_cumprod: torch.Tensor,
    *,
    route: Literal["state", "flow"] = "state",
) -> torch.Tensor:
    """x_0 of `spec`'s diffusers twin over `timesteps` from x_T (see the module docstring)."""
    sched, calls, scale = configure_twin(spec, timesteps, alphas_cumprod, route=route)
    return scheduler_loop(denoiser, x_T, sched, calls, scale)
