"""Stride schedules: which n of the T training timesteps a sampler visits.

Every schedule is a small pure function ``fn(n, alphas_cumprod, **params) -> Schedule`` returning
exactly n distinct timesteps in strictly decreasing order, for every n in 1..T. Schedules defined in a
continuous coordinate (sigma, logSNR, time) are mapped to fractional timesteps through the model's own
abar table (`pipeline.core.noise.t_from_sigma`) and then projected onto distinct integers by
`project_to_distinct`, so no int-cast can silently merge two steps (the original DDIM "quad" spacing
returns 96 unique steps for S = 100; ours returns 100).

Continuous families place their n points with both ends included: t = T-1 (sigma_max) first and
t = 0 (sigma_min) last; the sampler's final jump from the last timestep goes to abar = 1.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import StridelabError
from pipeline.io.files import atomic_write_json
from pipeline.core.noise import as_alphas_cumprod, log_snr_from_abar, sigma_at, sigmas_of, t_from_sigma

SCHEMA_VERSION = 1

LIFTED_FIELDS = ("model", "alphas_cumprod_sha256", "solver")

MODEL_SHIFT_KEY = "model_log_sigma_shift"
"""``meta`` key of a per-step model time shift (n floats, log sigma): step i integrates at its own level but the
network is told it sees log sigma_i + shift_i (`pipeline.core.noise.model_levels`). Only samplers that
can feed the model another time than the one they integrate at honour it (stridelab's solvers and
`pipeline.interop.ddim_scheduler.StrideDDIMScheduler`); sigma lists (k-diffusion, ComfyUI) cannot carry it."""

INVERSE_MODEL_SHIFT_KEY = "inverse_model_log_sigma_shift"
"""``meta`` key of the encoder's per-step model time shift (one float per step of `Schedule.encode_timesteps`, in
its order, least noisy first; log sigma): DDIM inversion's jump i lands at its own level but the network is told
log sigma_i + shift_i. Inversion evaluates eps at the point it jumps from, labelled with the level it jumps to; a
shift of that label corrects part of the approximation (``sweep --objective inversion --time-shift``). Honoured by
stridelab's round trip (`pipeline.metrics.recon.round_trip`) and
`pipeline.interop.ddim_inverse_scheduler.StrideDDIMInverseScheduler`."""
"""Top-level fields of a schedule file that `Schedule.from_dict` also keeps in ``meta`` (plain JSON has no meta)."""


# --------------------------------------------------------------------------------------------------
# Validation


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def validate_timesteps(timesteps: Sequence[int], num_train_timesteps: int, *, increasing: bool = False) -> tuple[int, ...]:
    """Return `timesteps` as a tuple of ints, or raise `StridelabError` naming the first bad value.

    Valid: non-empty, every entry an integer in [0, T-1], strictly decreasing (hence duplicate-free);
    strictly increasing with ``increasing=True`` (the order an inversion walks).
    """
    if isinstance(timesteps, torch.Tensor):
        if timesteps.is_floating_point():
            raise StridelabError(f"timesteps must be integers, got a {timesteps.dtype} tensor")
        timesteps = timesteps.tolist()
    elif isinstance(timesteps, np.ndarray):
        if not np.issubdtype(timesteps.dtype, np.integer):
            raise StridelabError(f"timesteps must be integers, got an array of {timesteps.dtype}")
        timesteps = timesteps.tolist()
    if isinstance(timesteps, (str, bytes)) or not isinstance(timesteps, Sequence):
        raise StridelabError(f"timesteps must be a list of integers, got {type(timesteps).__name__}")
    if len(timesteps) == 0:
        raise StridelabError("timesteps is empty: a schedule needs at least one step")
    T = int(num_train_timesteps)
    out: list[int] = []
    for i, v in enumerate(timesteps):
        if not _is_int(v):
            raise StridelabError(f"timesteps[{i}] = {v!r} is not an integer")
        v = int(v)
        if not 0 <= v <= T - 1:
            raise StridelabError(f"timesteps[{i}] = {v} is out of range [0, {T - 1}]")
        if out and (v <= out[-1] if increasing else v >= out[-1]):
            order = "increasing" if increasing else "decreasing"
            what = "a duplicate" if v == out[-1] else f"not {order}"
            raise StridelabError(f"timesteps[{i}] = {v} is {what} (previous {out[-1]}): must be strictly {order}")
        out.append(v)
    return tuple(out)


def check_nfe(n: Any, num_train_timesteps: int) -> int:
    """n as an int in [1, T], or a `StridelabError` naming it."""
    if not _is_int(n) or not 1 <= int(n) <= num_train_timesteps:
        raise StridelabError(f"nfe must be an integer in [1, {num_train_timesteps}], got {n!r}")
    return int(n)


def project_to_distinct(t_desc: Sequence[float] | np.ndarray, num_train_timesteps: int) -> tuple[int, ...]:
    """Round decreasing fractional timesteps to n distinct integers in [0, T-1].

    Rounds each value, clamps entry i (0 = noisiest) into [n-1-i, T-1-i] so that a strictly decreasing
    solution exists, then walks from the clean end up, pushing any collision one step noisier. The
    result keeps the low-noise end where the continuous schedule put it (that is where dense steps
    matter) and differs from plain rounding only where rounding would merge steps.
    """
    t = np.asarray(t_desc, dtype=np.float64)
    n, T = t.size, int(num_train_timesteps)
    if n == 0 or n > T:
        raise StridelabError(f"cannot place {n} distinct steps among {T} timesteps")
    if not np.isfinite(t).all():
        raise StridelabError("schedule produced non-finite timesteps")
    i = np.arange(n)
    k = np.clip(np.rint(t), n - 1 - i, T - 1 - i).astype(np.int64)
    for j in range(n - 2, -1, -1):
        k[j] = max(k[j], k[j + 1] + 1)
    return tuple(int(v) for v in k)


# --------------------------------------------------------------------------------------------------
# The value type


@dataclass(frozen=True)
class Schedule:
    """A validated timestep list for a model with `num_train_timesteps` training steps.

    Attributes:
        timesteps: strictly decreasing ints in [0, T-1]; len = NFE (model evaluations for DDIM).
        num_train_timesteps: T of the model the schedule is meant for.
        name: where it came from (``"karras"``, ``"learned"``, ...).
        params: the parameters that produced it (JSON-serialisable).
        meta: anything else worth carrying (metrics, provenance, model hash); round-trips through JSON.
        inverse_timesteps: the strictly increasing list a DDIM inversion (encoder) walks when it is not
            ``reversed(timesteps)``; it must end where decoding starts (``timesteps[0]``), so the code it
            makes is at the decoder's first noise level. None (the default, and what a list equal to the
            reversed forward one is normalised to): the encoder walks the forward list backwards.
    """

    timesteps: tuple[int, ...]
    num_train_timesteps: int = 1000
    name: str = "custom"
    params: Mapping[str, Any] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)
    inverse_timesteps: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.num_train_timesteps) or self.num_train_timesteps < 2:
            raise StridelabError(f"num_train_timesteps must be an integer >= 2, got {self.num_train_timesteps!r}")
        object.__setattr__(self, "timesteps", validate_timesteps(self.timesteps, self.num_train_timesteps))
        if not isinstance(self.name, str) or not self.name:
            raise StridelabError(f"schedule name must be a non-empty string, got {self.name!r}")
        object.__setattr__(self, "params", dict(self.params))
        object.__setattr__(self, "meta", dict(self.meta))
        if self.inverse_timesteps is not None:
            try:
                inv = validate_timesteps(self.inverse_timesteps, self.num_train_timesteps, increasing=True)
            except StridelabError as e:
                raise StridelabError(f"inverse_{e}") from None
            if inv[-1] != self.timesteps[0]:
                raise StridelabError(f"inverse_timesteps ends at {inv[-1]} but decoding starts at timesteps[0] = "
                                     f"{self.timesteps[0]}: the encoder must end at the decoder's first noise level")
            object.__setattr__(self, "inverse_timesteps", None if inv == self.timesteps[::-1] else inv)
        for key, steps in ((MODEL_SHIFT_KEY, len(self.timesteps)), (INVERSE_MODEL_SHIFT_KEY, len(self.encode_timesteps))):
            shift = self.meta.get(key)
            if shift is None:
                continue
            ok = (isinstance(shift, (list, tuple)) and len(shift) == steps
                  and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in shift))
            if not ok:
                raise StridelabError(f"meta {key} must be a list of {steps} finite numbers (one per step), got {shift!r}")
            self.meta[key] = [float(v) for v in shift]

    @property
    def nfe(self) -> int:
        return len(self.timesteps)

    @property
    def model_shift(self) -> tuple[float, ...] | None:
        """The per-step model time shift (`MODEL_SHIFT_KEY` in meta; log sigma, one per step), or None. All zeros is
        the schedule itself."""
        shift = self.meta.get(MODEL_SHIFT_KEY)
        return None if shift is None or not any(shift) else tuple(shift)

    @property
    def inverse_model_shift(self) -> tuple[float, ...] | None:
        """The encoder's per-step model time shift (`INVERSE_MODEL_SHIFT_KEY` in meta; one per step of
        `encode_timesteps`, least noisy first), or None. All zeros is plain DDIM inversion."""
        shift = self.meta.get(INVERSE_MODEL_SHIFT_KEY)
        return None if shift is None or not any(shift) else tuple(shift)

    @property
    def encode_timesteps(self) -> tuple[int, ...]:
        """The increasing list DDIM inversion walks: `inverse_timesteps`, else the forward list reversed."""
        return self.inverse_timesteps if self.inverse_timesteps is not None else self.timesteps[::-1]

    def sigmas(self, alphas_cumprod: torch.Tensor) -> torch.Tensor:
        """k-diffusion-style sigmas, float64 shape [n + 1], decreasing, ending in 0 (the clean target)."""
        abar = as_alphas_cumprod(alphas_cumprod)
        if abar.numel() != self.num_train_timesteps:
            raise StridelabError(
                f"schedule is for T = {self.num_train_timesteps} but alphas_cumprod has {abar.numel()} entries"
            )
        s = sigmas_of(abar)[list(self.timesteps)]
        return torch.cat([s, s.new_zeros(1)])

    # JSON ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "nfe": self.nfe,
            "num_train_timesteps": self.num_train_timesteps,
            "timesteps": list(self.timesteps),
            "params": dict(self.params),
            # Only when the encoder differs from the reversed forward list: files stay as they were otherwise.
            **({"inverse_timesteps": list(self.inverse_timesteps)} if self.inverse_timesteps is not None else {}),
            **({"meta": dict(self.meta)} if self.meta else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Schedule":
        if not isinstance(d, Mapping):
            raise StridelabError(f"a schedule must be a JSON object, got {type(d).__name__}")
        if "timesteps" not in d:
            raise StridelabError("schedule has no 'timesteps' field")
        T = d.get("num_train_timesteps", 1000)
        params, meta = d.get("params", {}), d.get("meta", {})
        if not isinstance(params, Mapping) or not isinstance(meta, Mapping):
            raise StridelabError("schedule 'params' and 'meta' must be JSON objects")
        # Plain / downstream files carry these at the top level only; meta wins where both are present.
        meta = {**{k: d[k] for k in LIFTED_FIELDS if k in d}, **meta}
        inv = d.get("inverse_timesteps")
        sched = cls(tuple(d["timesteps"]) if isinstance(d["timesteps"], list) else d["timesteps"],
                    T, str(d.get("name", "custom")), params, meta,
                    tuple(inv) if isinstance(inv, list) else inv)
        if "nfe" in d and d["nfe"] != sched.nfe:
            raise StridelabError(f"schedule says nfe = {d['nfe']!r} but lists {sched.nfe} timesteps")
        return sched

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Schedule":
        try:
            d = json.loads(text, parse_constant=_reject_constant)
        except json.JSONDecodeError as e:
            raise StridelabError(f"invalid schedule JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        return cls.from_dict(d)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the schedule as JSON atomically."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Schedule":
        p = Path(path)
        if not p.is_file():
            raise StridelabError(f"schedule file not found: {p}")
        try:
            return cls.from_json(p.read_text(encoding="utf-8"))
        except StridelabError as e:
            raise StridelabError(f"{p}: {e}") from None
        except UnicodeDecodeError:
            raise StridelabError(f"{p}: not a UTF-8 text file") from None


def _reject_constant(name: str) -> None:
    raise StridelabError(f"schedule JSON contains {name}, which is not a valid timestep")


# --------------------------------------------------------------------------------------------------
# Schedules. Each: (n, alphas_cumprod, **params) -> Schedule.


def _T(alphas_cumprod: torch.Tensor) -> int:
    return as_alphas_cumprod(alphas_cumprod).numel()


def uniform(n: int, alphas_cumprod: torch.Tensor, steps_offset: int = 0) -> Schedule:
    """Even stride, diffusers' ``leading`` spacing and the DDIM paper's ``range(0, T, T // n)``."""
    T = _T(alphas_cumprod)
    n = check_nfe(n, T)
    ts = (np.arange(n) * (T // n))[::-1] + int(steps_offset)
    return Schedule(tuple(int(v) for v in ts), T, "uniform", {"steps_offset": int(steps_offset)})


def linspace(n: int, alphas_cumprod: torch.Tensor) -> Schedule:
    """diffusers' ``linspace`` spacing: round(linspace(0, T-1, n)), reversed; includes T-1 and 0."""
    T = _T(alphas_cumprod)
    n = check_nfe(n, T)
    return Schedule(project_to_distinct(np.linspace(0, T - 1, n)[::-1], T), T, "linspace")


def trailing(n: int, alphas_cumprod: torch.Tensor) -> Schedule:
    """diffusers' ``trailing`` spacing: round(arange(T, 0, -T/n)) - 1; starts at T-1 (Lin et al. 2024)."""
    T = _T(alphas_cumprod)
    n = check_nfe(n, T)
    ts = (np.round(np.arange(n) * (-T / n) + T) - 1)[:n]
    return Schedule(project_to_distinct(ts, T), T, "trailing")


def quadratic(n: int, alphas_cumprod: torch.Tensor, max_frac: float = 0.8) -> Schedule:
    """DDIM paper's quadratic stride, tau_i = c i^2 up to max_frac * T (App. D.2), with n distinct steps."""
    T = _T(alphas_cumprod)
    n = check_nfe(n, T)
    if not 0 < max_frac <= 1:
        raise StridelabError(f"max_frac must be in (0, 1], got {max_frac}")
    ts = np.linspace(0, math.sqrt(max_frac * T), n)[::-1] ** 2
    return Schedule(project_to_distinct(ts, T), T, "quadratic", {"max_frac": float(max_frac)})


def _sigma_range(alphas_cumprod: torch.Tensor, sigma_min: float | None, sigma_max: float | None) -> tuple[float, float]:
    sig = sigmas_of(alphas_cumprod)
    lo = float(sig[0]) if sigma_min is None else float(sigma_min)
    hi = float(sig[-1]) if sigma_max is None else float(sigma_max)
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
        raise StridelabError(f"need 0 < sigma_min < sigma_max, got sigma_min={lo}, sigma_max={hi}")
    return lo, hi


def _from_sigmas(sigmas: np.ndarray, alphas_cumprod: torch.Tensor) -> tuple[int, ...]:
    t = t_from_sigma(torch.as_tensor(sigmas, dtype=torch.float64), alphas_cumprod)
    return project_to_distinct(t.numpy(), _T(alphas_cumprod))


def karras(
    n: int, alphas_cumprod: torch.Tensor, rho: float = 7.0, sigma_min: float | None = None, sigma_max: float | None = None
) -> Schedule:
    """Karras et al. 2022 (EDM) eq. 5: sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho."""
    T = _T(alphas_cumprod)
    n = check_nfe(n, T)
    if not rho > 0:
        raise StridelabError(f"rho must be > 0, got {rho}")
    lo, hi = _sigma_range(alphas_cumprod, sigma_min, sigma_max)
    ramp = np.linspace(0, 1, n)
    sig = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    return Schedule(_from_sigmas(sig, alphas_cumprod), T, "karras", {"rho": float(rho)})


def logsnr(n: int, alphas_cumprod: torch.Tensor) -> Schedule:
    """Uniform in logSNR = -2 log sigma between the model's ends (DPM-Solver ``logSNR``; equals
    k-diffusion's ``get_sigmas_exponential``)."""
    T = _T(alphas_cumprod)
    n = check_nfe(n, T)
    lam = log_snr_from_abar(as_alphas_cumprod(alphas_cumprod))
    grid = np.linspace(float(lam[-1]), float(lam[0]), n)
    return Schedule(_from_sigmas(np.exp(-grid / 2), alphas_cumprod), T, "logsnr")


def time_quadratic(n: int, alphas_cumprod: torch.Tensor) -> Schedule:
    """DPM-Solver ``time_quadratic``: continuous time tau in [1/T, 1], tau_i = linspace(1, sqrt(1/T), n)^2,
    discrete t = tau T - 1."""
    T = _T(alphas_cumprod)
    n = check_nfe(n, T)
    tau = np.linspace(1.0, math.sqrt(1.0 / T), n) ** 2
    return Schedule(project_to_distinct(tau * T - 1, T), T, "time_quadratic")


def beta(n: int, alphas_cumprod: torch.Tensor, alpha: float = 0.6, beta: float = 0.6) -> Schedule:
    """Beta-distribution spacing (Lee et al. 2024; diffusers ``use_beta_sigmas``): sigma linear in the
    Beta(alpha, beta) PPF of 1 - linspace(0, 1, n)."""
    from scipy.stats import beta as beta_dist

    T = _T(alphas_cumprod)
    n = check_nfe(n, T)
    if not (alpha > 0 and beta > 0):
        raise StridelabError(f"beta spacing needs alpha > 0 and beta > 0, got {alpha}, {beta}")
    lo, hi = _sigma_range(alphas_cumprod, None, None)
    ppf = beta_dist.ppf(1 - np.linspace(0, 1, n), alpha, beta)
    return Schedule(_from_sigmas(lo + ppf * (hi - lo), alphas_cumprod), T, "beta", {"alpha": alpha, "beta": beta})


def _default_ays_reference() -> list[int]:
    from diffusers.schedulers import AysSchedules

    return list(AysSchedules["StableDiffusionTimesteps"])


def interpolated(n: int, alphas_cumprod: torch.Tensor, reference: Sequence[int] | None = None) -> Schedule:
    """Log-linear interpolation of a reference timestep list to n steps (Align Your Steps, Sabour et al.
    2024, sec. 3.3): interpolate log sigma of the reference over an even grid. Default reference:
    diffusers' ``AysSchedules["StableDiffusionTimesteps"]``."""
    T = _T(alphas_cumprod)
    n = check_nfe(n, T)
    ref = validate_timesteps(list(reference) if reference is not None else _default_ays_reference(), T)
    if len(ref) < 2:
        raise StridelabError("interpolation needs a reference with at least 2 timesteps")
    log_sig = sigma_at(torch.tensor(ref, dtype=torch.float64), alphas_cumprod).log().numpy()
    grid = np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(ref)), log_sig)
    return Schedule(_from_sigmas(np.exp(grid), alphas_cumprod), T, "ays", {"reference": list(ref)})


ScheduleFn = Callable[..., Schedule]

SCHEDULES: dict[str, ScheduleFn] = {
    "uniform": uniform,
    "linspace": linspace,
    "trailing": trailing,
    "quadratic": quadratic,
    "karras": karras,
    "logsnr": logsnr,
    "time_quadratic": time_quadratic,
    "beta": beta,
    "ays": interpolated,
}
"""Every baseline schedule by name; all share the signature ``(n, alphas_cumprod, **params)``."""


def with_noisiest_step(schedule: Schedule, t_top: int) -> Schedule:
    """`schedule` with its noisiest step raised to `t_top` (where it sits lower); the other steps unchanged.

    Why: a DDIM inversion round trip encodes up to the schedule's first step, so a schedule that starts
    lower makes a code closer to the image and an easier round trip without being a better encoder. With
    the step pinned, every schedule encodes to the same noise level (t_top = T - 1: to x_T, the DDIM
    paper's Table 2 protocol). The original first step is kept in ``meta["noisiest_step_was"]``.
    """
    ts = schedule.timesteps
    if not 0 <= t_top < schedule.num_train_timesteps:
        raise StridelabError(f"the noisiest step must be in [0, {schedule.num_train_timesteps - 1}], got {t_top}")
    if ts[0] >= t_top:
        return schedule
    return Schedule((int(t_top), *ts[1:]), schedule.num_train_timesteps, schedule.name, dict(schedule.params),
                    {**schedule.meta, "noisiest_step_was": int(ts[0])})


def make_schedule(name: str, n: int, alphas_cumprod: torch.Tensor, **params: Any) -> Schedule:
    """Build a registered schedule, or raise `StridelabError` listing the valid names."""
    fn = SCHEDULES.get(name)
    if fn is None:
        raise StridelabError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)} or a .json file")
    try:
        return fn(n, alphas_cumprod, **params)
    except TypeError as e:
        raise StridelabError(f"bad parameters for schedule {name!r}: {e}") from None


def resolve_schedule(spec: str, n: int | None, alphas_cumprod: torch.Tensor) -> Schedule:
    """A schedule from a CLI spec: a registered name (needs n) or a path to a schedule JSON file."""
    if spec.endswith(".json") or os.sep in spec:
        sched = Schedule.load(spec)
        T = _T(alphas_cumprod)
        if sched.num_train_timesteps != T:
            raise StridelabError(f"{spec}: schedule is for T = {sched.num_train_timesteps}, the model has T = {T}")
        return sched
    if n is None:
        raise StridelabError(f"schedule {spec!r} needs `nfe`")
    return make_schedule(spec, n, alphas_cumprod)
