"""Search spaces over step placements: an Optuna trial in, a valid `Schedule` out.

Every space has the same narrow interface (`SearchSpace`):

- ``suggest(trial) -> Schedule``: draw parameters from an Optuna trial (or a ``FixedTrial``) and build a
  strictly decreasing, duplicate-free schedule (through `pipeline.core.schedules.project_to_distinct`);
- ``params_of(schedule) -> dict``: parameters that reproduce a given schedule (exactly where the family
  can, else the closest member), to add a baseline to a study as a warm start;
- ``distributions()``: the Optuna distributions, for ``optuna.trial.create_trial``.

Spaces (``SPACES``):

``warp``
    A 5-parameter monotone warp of the time axis. With u_i = i / (n - 1) (0 = noisiest),
    t_top = min(t_max_frac * T, T - 1) and t_bot = t_min_frac * T (the last step):

    - time branch:  t(u) = t_bot + (t_top - t_bot) (1 - u)^time_power
    - sigma branch: sigma(u) interpolates linearly in the Box-Cox coordinate
      (sigma^a - 1) / a (log sigma at a = 0) from sigma(t_top) to sigma(t_bot), a = ``sigma_power``
    - blend:        t_i = (1 - blend) t_time(u_i) + blend t_sigma(u_i)

    Special cases (exact, see tests; t_min_frac 0 unless said): uniform (blend 0, power 1, t_max_frac =
    (T // n)(n - 1) / T), linspace (blend 0, power 1, t_max_frac (T-1)/T), trailing (linspace with
    t_min_frac = (T // n - 1) / T), quadratic (blend 0, power 2, t_max_frac = max_frac), karras (blend 1,
    sigma_power 1/rho, t_max_frac 1), logsnr (blend 1, sigma_power 0, t_max_frac 1). Why t_min_frac: where
    the last step sits matters as much as the stride (a last model call at t = 0 is nearly wasted; one at
    t = 99, as trailing does, leaves a big final jump), and no stride family moves it.

``free`` / ``free_t``
    Free placement of all n steps: n + 1 positive gaps g_0..g_n, normalised to sum 1, laid down from the
    top of the coordinate range (log sigma for ``free``, t for ``free_t``): c_i = c_max - range *
    sum(g_0..g_i). g_0 lets the first step sit below t = T - 1, g_n is what is left above t = 0.

``steps``
    The n integer timesteps themselves (``t00`` > ``t01`` > ...): the space of the polish phase.

Example:
    >>> import optuna
    >>> from pipeline.core.noise import make_alphas_cumprod
    >>> from pipeline.core.schedules import karras
    >>> abar = make_alphas_cumprod()
    >>> space = make_space("warp", 10, abar)
    >>> space.suggest(optuna.trial.FixedTrial(space.params_of(karras(10, abar)))).timesteps == karras(10, abar).timesteps
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import optuna
import torch
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution

from pipeline.errors import StridelabError
from pipeline.core.noise import as_alphas_cumprod, sigmas_of
from pipeline.core.schedules import Schedule, check_nfe, project_to_distinct, with_noisiest_step


class SearchSpace(Protocol):
    """What the sweep needs from a space."""

    name: str
    nfe: int

    def suggest(self, trial: optuna.trial.BaseTrial) -> Schedule: ...

    def params_of(self, schedule: Schedule) -> dict[str, float]: ...

    def distributions(self) -> dict[str, BaseDistribution]: ...


def box_cox(x: np.ndarray, a: float) -> np.ndarray:
    """(x^a - 1) / a, and log x at a = 0 (continuous in a)."""
    lx = np.log(x)
    return lx if abs(a) < 1e-12 else np.expm1(a * lx) / a


def inv_box_cox(y: np.ndarray, a: float) -> np.ndarray:
    """Inverse of `box_cox`."""
    return np.exp(y) if abs(a) < 1e-12 else np.exp(np.log1p(a * y) / a)


class _LogSigmaTable:
    """log sigma(t) by linear interpolation over the model's table, and its inverse: the same maps as
    `pipeline.core.noise.sigma_at` / `t_from_sigma`, in numpy (the warp fit calls them thousands of times)."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.log_sigma = sigmas_of(alphas_cumprod).log().numpy()
        self.t_grid = np.arange(self.log_sigma.size, dtype=np.float64)

    def at(self, t: np.ndarray | float) -> np.ndarray:
        return np.interp(t, self.t_grid, self.log_sigma)

    def t_of(self, log_sigma: np.ndarray) -> np.ndarray:
        """Fractional t; values outside the table clamp to 0 or T - 1."""
        return np.interp(log_sigma, self.log_sigma, self.t_grid)


# --------------------------------------------------------------------------------------------------
# warp


class WarpSpace:
    """Few-parameter monotone warp family (see the module docstring)."""

    name = "warp"
    RANGES: dict[str, tuple[float, float, bool]] = {
        # name: (low, high, log)
        "blend": (0.0, 1.0, False),
        "time_power": (0.5, 4.0, True),
        "sigma_power": (0.0, 1.0, False),
        "t_max_frac": (0.5, 1.0, False),
        "t_min_frac": (0.0, 0.1, False),
    }

    def __init__(self, nfe: int, alphas_cumprod: torch.Tensor):
        self.abar = as_alphas_cumprod(alphas_cumprod)
        self.T = self.abar.numel()
        self.nfe = check_nfe(nfe, self.T)
        self.table = _LogSigmaTable(self.abar)

    def distributions(self) -> dict[str, BaseDistribution]:
        return {k: FloatDistribution(lo, hi, log=lg) for k, (lo, hi, lg) in self.RANGES.items()}

    def fractional(self, blend: float, time_power: float, sigma_power: float, t_max_frac: float,
                   t_min_frac: float = 0.0) -> np.ndarray:
        """The continuous (fractional, decreasing) timesteps before projection to integers."""
        n, T = self.nfe, self.T
        u = np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(1)
        t_top = min(float(t_max_frac) * T, T - 1.0)
        t_bot = min(float(t_min_frac) * T, t_top)
        t_time = t_bot + (t_top - t_bot) * (1.0 - u) ** float(time_power)
        if blend <= 0.0:
            return t_time
        a = float(sigma_power)
        y_hi = box_cox(np.exp(self.table.at(t_top)), a)
        y_lo = box_cox(np.exp(self.table.at(t_bot)), a)
        t_sig = self.table.t_of(np.log(inv_box_cox(y_hi + u * (y_lo - y_hi), a)))
        return (1.0 - blend) * t_time + blend * t_sig

    def build(self, params: Mapping[str, float]) -> Schedule:
        p = {k: float(params[k]) for k in self.RANGES}
        ts = project_to_distinct(self.fractional(**p), self.T)
        return Schedule(ts, self.T, "warp", {k: round(v, 6) for k, v in p.items()})

    def suggest(self, trial: optuna.trial.BaseTrial) -> Schedule:
        params = {k: trial.suggest_float(k, lo, hi, log=lg) for k, (lo, hi, lg) in self.RANGES.items()}
        return self.build(params)

    def _candidates(self, schedule: Schedule) -> list[dict[str, float]]:
        """Closed-form members that may reproduce a named baseline exactly."""
        T, n = self.T, self.nfe
        z = {"t_min_frac": 0.0}
        out = [
            {"blend": 0.0, "time_power": 1.0, "sigma_power": 0.0, "t_max_frac": (T // n) * (n - 1) / T, **z},  # uniform
            {"blend": 0.0, "time_power": 1.0, "sigma_power": 0.0, "t_max_frac": (T - 1) / T, **z},  # linspace
            {"blend": 0.0, "time_power": 1.0, "sigma_power": 0.0, "t_max_frac": (T - 1) / T,
             "t_min_frac": (T // n - 1) / T},  # trailing
            {"blend": 1.0, "time_power": 1.0, "sigma_power": 0.0, "t_max_frac": 1.0, **z},  # logsnr
        ]
        rho = float(schedule.params.get("rho", 7.0))
        out.append({"blend": 1.0, "time_power": 1.0, "sigma_power": 1.0 / rho, "t_max_frac": 1.0, **z})  # karras
        max_frac = float(schedule.params.get("max_frac", 0.8))
        out.append({"blend": 0.0, "time_power": 2.0, "sigma_power": 0.0, "t_max_frac": max_frac, **z})  # quadratic
        return [c for c in out if all(self.RANGES[k][0] <= v <= self.RANGES[k][1] for k, v in c.items())]

    def params_of(self, schedule: Schedule) -> dict[str, float]:
        """Parameters reproducing `schedule` exactly when it is a member, else a least-squares fit in log sigma."""
        self._check(schedule)
        for c in self._candidates(schedule):
            if self.build(c).timesteps == schedule.timesteps:
                return c
        return self._fit(schedule)

    def _fit(self, schedule: Schedule) -> dict[str, float]:
        from scipy.optimize import minimize

        target = self.table.at(np.array(schedule.timesteps, dtype=np.float64))
        keys = list(self.RANGES)
        lo = np.array([self.RANGES[k][0] for k in keys])
        hi = np.array([self.RANGES[k][1] for k in keys])

        def loss(z: np.ndarray) -> float:
            p = dict(zip(keys, np.clip(z, lo, hi)))
            t = np.clip(self.fractional(**p), 0, self.T - 1)
            return float(np.mean((self.table.at(t) - target) ** 2))

        best = None
        for c in self._candidates(schedule):
            r = minimize(loss, np.array([c[k] for k in keys]), method="Nelder-Mead",
                         options={"maxiter": 400, "xatol": 1e-4, "fatol": 1e-8})
            if best is None or r.fun < best.fun:
                best = r
        return {k: float(v) for k, v in zip(keys, np.clip(best.x, lo, hi))}

    def _check(self, schedule: Schedule) -> None:
        if schedule.num_train_timesteps != self.T or schedule.nfe != self.nfe:
            raise StridelabError(
                f"schedule has T = {schedule.num_train_timesteps}, nfe = {schedule.nfe}; space has T = {self.T}, nfe = {self.nfe}"
            )


# --------------------------------------------------------------------------------------------------
# free placement


class FreeSpace:
    """Free placement of all n steps as n + 1 positive gaps in log sigma (``coord="logsigma"``) or t."""

    GAP_LOW, GAP_HIGH = 1e-3, 1.0

    def __init__(self, nfe: int, alphas_cumprod: torch.Tensor, coord: str = "logsigma"):
        if coord not in ("logsigma", "t"):
            raise StridelabError(f"unknown coordinate {coord!r}; choose logsigma or t")
        self.abar = as_alphas_cumprod(alphas_cumprod)
        self.T = self.abar.numel()
        self.nfe = check_nfe(nfe, self.T)
        self.coord = coord
        self.name = "free" if coord == "logsigma" else "free_t"
        self.keys = [f"g{i:02d}" for i in range(self.nfe + 1)]
        self.table = _LogSigmaTable(self.abar)
        # The range reaches half a timestep past both ends (clipped after placement), so the smallest
        # allowed gap still rounds onto t = T - 1 and t = 0: every schedule is reproducible exactly.
        ls = self.table.log_sigma
        if coord == "logsigma":
            self.c_max = float(ls[-1] + 0.5 * (ls[-1] - ls[-2]))
            self.c_min = float(ls[0] - 0.5 * (ls[1] - ls[0]))
        else:
            self.c_max, self.c_min = self.T - 0.5, -0.5

    def distributions(self) -> dict[str, BaseDistribution]:
        return {k: FloatDistribution(self.GAP_LOW, self.GAP_HIGH, log=True) for k in self.keys}

    def _t_of(self, c: np.ndarray) -> np.ndarray:
        return c if self.coord == "t" else self.table.t_of(c)

    def _c_of(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        return t if self.coord == "t" else self.table.at(t)

    def build(self, params: Mapping[str, float]) -> Schedule:
        g = np.array([float(params[k]) for k in self.keys])
        if not (np.isfinite(g).all() and (g > 0).all()):
            raise StridelabError(f"free-placement gaps must be positive and finite, got {g.tolist()}")
        frac = np.cumsum(g / g.sum())[: self.nfe]
        c = self.c_max - (self.c_max - self.c_min) * frac
        ts = project_to_distinct(np.clip(self._t_of(c), 0, self.T - 1), self.T)
        return Schedule(ts, self.T, self.name, {"coord": self.coord})

    def suggest(self, trial: optuna.trial.BaseTrial) -> Schedule:
        return self.build({k: trial.suggest_float(k, self.GAP_LOW, self.GAP_HIGH, log=True) for k in self.keys})

    def params_of(self, schedule: Schedule) -> dict[str, float]:
        """Gaps of `schedule`, scaled so the largest is 1 and clipped to the lower bound (within a timestep)."""
        if schedule.num_train_timesteps != self.T or schedule.nfe != self.nfe:
            raise StridelabError(
                f"schedule has T = {schedule.num_train_timesteps}, nfe = {schedule.nfe}; space has T = {self.T}, nfe = {self.nfe}"
            )
        c = self._c_of(np.array(schedule.timesteps, dtype=np.float64))
        edges = np.concatenate([[self.c_max], c, [self.c_min]])
        g = -np.diff(edges)
        g = np.clip(g / g.max(), self.GAP_LOW, self.GAP_HIGH)
        return {k: float(v) for k, v in zip(self.keys, g)}


# --------------------------------------------------------------------------------------------------
# integer timesteps


class StepsSpace:
    """The n timesteps themselves, as integers t00 > t01 > ... (projected to distinct if a sampler breaks
    the order). The space of the polish phase (`search.placement.polish`), where every trial is enqueued with its
    exact timesteps; as a space for a global sampler it is the largest and the slowest to search."""

    name = "steps"

    def __init__(self, nfe: int, alphas_cumprod: torch.Tensor):
        self.abar = as_alphas_cumprod(alphas_cumprod)
        self.T = self.abar.numel()
        self.nfe = check_nfe(nfe, self.T)
        self.keys = [f"t{i:02d}" for i in range(self.nfe)]

    def distributions(self) -> dict[str, BaseDistribution]:
        return {k: IntDistribution(0, self.T - 1) for k in self.keys}

    def build(self, params: Mapping[str, float]) -> Schedule:
        t = np.sort(np.array([float(params[k]) for k in self.keys]))[::-1]
        return Schedule(project_to_distinct(t, self.T), self.T, self.name, {})

    def suggest(self, trial: optuna.trial.BaseTrial) -> Schedule:
        return self.build({k: trial.suggest_int(k, 0, self.T - 1) for k in self.keys})

    def params_of(self, schedule: Schedule) -> dict[str, float]:
        if schedule.num_train_timesteps != self.T or schedule.nfe != self.nfe:
            raise StridelabError(
                f"schedule has T = {schedule.num_train_timesteps}, nfe = {schedule.nfe}; space has T = {self.T}, nfe = {self.nfe}"
            )
        return {k: int(v) for k, v in zip(self.keys, schedule.timesteps)}


SPACES: dict[str, Any] = {
    "warp": WarpSpace,
    "free": lambda nfe, abar: FreeSpace(nfe, abar, "logsigma"),
    "free_t": lambda nfe, abar: FreeSpace(nfe, abar, "t"),
    "steps": StepsSpace,
}
"""Every search space by name: ``SPACES[name](nfe, alphas_cumprod) -> SearchSpace``."""


class NoisiestPinned:
    """A space whose every schedule starts at `t_top` (`pipeline.core.schedules.with_noisiest_step`).

    The inversion objectives use it with t_top = T - 1, so a trial cannot lower its round-trip error by
    encoding less far; the wrapped space's parameters and distributions are unchanged.
    """

    def __init__(self, space: SearchSpace, t_top: int):
        self.inner, self.t_top = space, int(t_top)
        self.name, self.nfe = space.name, space.nfe

    def suggest(self, trial: optuna.trial.BaseTrial) -> Schedule:
        return with_noisiest_step(self.inner.suggest(trial), self.t_top)

    def build(self, params: Mapping[str, float]) -> Schedule:
        return with_noisiest_step(self.inner.build(params), self.t_top)

    def params_of(self, schedule: Schedule) -> dict[str, float]:
        return self.inner.params_of(schedule)

    def distributions(self) -> dict[str, BaseDistribution]:
        return self.inner.distributions()

    def __getattr__(self, name: str) -> Any:  # the wrapped space's own attributes (``keys`` of ``steps``, ...)
        if name == "inner":  # not yet set (copy, unpickle): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)


def make_space(name: str, nfe: int, alphas_cumprod: torch.Tensor) -> SearchSpace:
    """Build a registered space, or raise `StridelabError` listing the valid names."""
    if name not in SPACES:
        raise StridelabError(f"unknown search space {name!r}; choose one of {', '.join(SPACES)}")
    return SPACES[name](nfe, alphas_cumprod)
