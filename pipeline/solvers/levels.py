"""The noise levels of an explicit timestep list, in every coordinate a solver of the family steps in.

A run over ``timesteps = (t_0 > t_1 > ... > t_{n-1})`` visits n + 1 levels: the n listed ones and clean
data (abar = 1) after the last. Level i has (python floats, float64, computed once per run):

==============  ====================================  ============================================
name            meaning                               paper / diffusers
==============  ====================================  ============================================
``abar[i]``     abar at t_i; 1.0 at i = n             alpha_t^2 (DPM-Solver) / ``alphas_cumprod``
``alpha[i]``    sqrt(abar)                            alpha_t / ``alpha_t``
``sigma_vp[i]`` sqrt(1 - abar); 0 at i = n            sigma_t (DPM-Solver, UniPC) / ``sigma_t``
``sigma[i]``    sqrt((1 - abar) / abar); 0 at i = n   sigma (EDM, k-diffusion) / ``sigmas``
``lam[i]``      log(alpha / sigma_vp) = logSNR / 2;   lambda_t / ``lambda_t``
                +inf at i = n
==============  ====================================  ============================================

Two state coordinates are used: the VP sample x (the model's input, DPM-Solver++ and UniPC step in it) and
x~ = x / sqrt(abar) = x * sqrt(1 + sigma^2) (Euler, Heun and iPNDM step in it: the probability-flow ODE is
dx~/dsigma = eps(x, t), EDM eq. 4 with s = 1). At sigma = 0 the two coincide (x~ = x = x_0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pipeline.core.noise import as_alphas_cumprod
from pipeline.core.schedules import validate_timesteps
from pipeline.errors import StridelabError


@dataclass(frozen=True)
class Levels:
    """The n + 1 levels of a run (see the module docstring); every list has n + 1 python floats."""

    timesteps: tuple[int, ...]
    abar: tuple[float, ...]
    alpha: tuple[float, ...]
    sigma_vp: tuple[float, ...]
    sigma: tuple[float, ...]
    lam: tuple[float, ...]

    @property
    def n(self) -> int:
        """Number of steps (= listed timesteps)."""
        return len(self.timesteps)


def levels_of(timesteps: Sequence[int], alphas_cumprod: torch.Tensor) -> Levels:
    """Validate `timesteps` against the abar table [T] and compute its levels (final level: abar = 1).

    Raises:
        StridelabError: a bad table or a bad list (not strictly decreasing ints in [0, T - 1]).
    """
    table = as_alphas_cumprod(alphas_cumprod)
    ts = validate_timesteps(timesteps, table.numel())
    abar = [table[t].item() for t in ts] + [1.0]
    # 1 - abar in float64 from the float64 table: near abar = 1 (t ~ 0) this is where precision matters.
    sigma_vp = [(1.0 - a) ** 0.5 for a in abar]
    lam = [math.log(a**0.5 / s) if s > 0 else math.inf for a, s in zip(abar, sigma_vp)]
    return Levels(ts, tuple(abar), tuple(a**0.5 for a in abar), tuple(sigma_vp),
                  tuple(((1.0 - a) / a) ** 0.5 for a in abar), tuple(lam))


def evaluate(denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, t: int) -> torch.Tensor:
    """eps = denoiser(x, t) for a batch x [B, ...] at one listed integer timestep, in x's dtype."""
    t_batch = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
    return denoiser(x, t_batch).to(x.dtype)


def require_deterministic(name: str, eta: float) -> None:
    """The ODE solvers take no eta: a nonzero one is a user error, not something to ignore."""
    if eta:
        raise StridelabError(f"> 0 needs the ddim solver ({name} is deterministic), got {eta}", param="eta")
