"""Sigma lists for k-diffusion and ComfyUI, and a plain JSON any tool can read.

A schedule of integer timesteps as the noise levels other samplers take: `k_diffusion_sigmas` (n + 1
sigmas ending in 0, for ``k_diffusion.sampling.sample_*``), `schedule_from_sigmas` (back),
`comfyui_sigma_string` (ComfyUI's ManualSigmas input for SamplerCustom, and `parse_sigma_string` back)
and `to_plain_json` (timesteps, sigmas and abar at each step, and the solver it was tuned for). Each
checks the model first (`pipeline.interop.apply.check_compatible`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pipeline.core.noise import as_alphas_cumprod, t_from_sigma
from pipeline.core.schedules import Schedule, project_to_distinct
from pipeline.errors import StridelabError
from pipeline.interop.apply import alphas_cumprod_sha256, check_compatible, warn_if_shift_dropped
from pipeline.interop.reuse import recorded_solver

PLAIN_JSON_FORMAT = "stridelab.schedule.plain/1"



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
    warn_if_shift_dropped(schedule, "a sigma list (k-diffusion, ComfyUI)")
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
