"""Discrete DDPM noise schedules and the conversions between their coordinates.

Notation (shared with `pipeline.solvers.ddim`):

==================  ==========================================================  =========================
name here           meaning                                                     diffusers / papers
==================  ==========================================================  =========================
``T``               number of training timesteps, t in {0, ..., T-1}             ``num_train_timesteps``
``alphas_cumprod``  abar_t = prod_{s<=t} (1 - beta_s), shape [T]                 ``alphas_cumprod``
``sigma``           sqrt((1 - abar) / abar): noise level of x / sqrt(abar)       k-diffusion ``sigmas``
``log_snr``         log(abar / (1 - abar)) = -2 log sigma                        lambda = log_snr / 2
                                                                                 (DPM-Solver)
==================  ==========================================================  =========================

Fractional timesteps are defined by linear interpolation of log(sigma) between neighbouring integer
timesteps, as k-diffusion's ``DiscreteSchedule.t_to_sigma`` does; `t_from_sigma` is its inverse.
All conversions return float64: abar is within 1e-4 of 1 at t = 0, where float32 loses the digits that
decide where a step lands.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch

from pipeline.errors import StridelabError

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
BETA_SCHEDULES: tuple[str, ...] = get_args(BetaSchedule)


def make_betas(
    beta_schedule: str = "linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
) -> torch.Tensor:
    """Betas exactly as diffusers' DDPMScheduler builds them (float32, shape [T])."""
    if num_train_timesteps < 2:
        raise StridelabError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
    T = int(num_train_timesteps)
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        # Latent-diffusion schedule: linear in sqrt(beta).
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        # Nichol & Dhariwal 2021, eq. 17, with beta capped at 0.999.
        def abar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)]
        return torch.tensor(betas, dtype=torch.float32)
    raise StridelabError(f"unknown beta_schedule {beta_schedule!r}; choose one of {', '.join(BETA_SCHEDULES)}")


def make_alphas_cumprod(
    beta_schedule: str = "linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
) -> torch.Tensor:
    """abar_t for t = 0..T-1, bit-equal to diffusers' ``DDPMScheduler.alphas_cumprod``, returned as float64.

    The cumulative product is taken in float32, as diffusers does, so a model trained with diffusers sees
    exactly the noise levels it was trained on; only then is it widened.
    """
    betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
    return torch.cumprod(1.0 - betas, dim=0).double()


def as_alphas_cumprod(alphas_cumprod) -> torch.Tensor:
    """Validate a user-supplied abar table: 1-D, finite, in (0, 1), strictly decreasing. Returns float64 CPU."""
    a = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
    if a.ndim != 1 or a.numel() < 2:
        raise StridelabError(f"alphas_cumprod must be 1-D with >= 2 entries, got shape {tuple(a.shape)}")
    if not torch.isfinite(a).all() or (a <= 0).any() or (a >= 1).any():
        raise StridelabError("alphas_cumprod must be finite and strictly inside (0, 1)")
    if not (a[1:] < a[:-1]).all():
        raise StridelabError("alphas_cumprod must be strictly decreasing in t")
    return a


def sigma_from_abar(abar: torch.Tensor | float) -> torch.Tensor:
    """sigma = sqrt((1 - abar) / abar) (the variance-exploding noise level)."""
    abar = torch.as_tensor(abar, dtype=torch.float64)
    return ((1 - abar) / abar).sqrt()


def abar_from_sigma(sigma: torch.Tensor | float) -> torch.Tensor:
    """abar = 1 / (1 + sigma^2); sigma = 0 gives abar = 1 (clean data)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return 1 / (1 + sigma**2)


def log_snr_from_abar(abar: torch.Tensor | float) -> torch.Tensor:
    """log SNR = log(abar / (1 - abar)); DPM-Solver's lambda is half of it."""
    abar = torch.as_tensor(abar, dtype=torch.float64)
    return torch.log(abar) - torch.log1p(-abar)


def abar_from_log_snr(log_snr: torch.Tensor | float) -> torch.Tensor:
    """Inverse of `log_snr_from_abar`: abar = sigmoid(log_snr)."""
    return torch.sigmoid(torch.as_tensor(log_snr, dtype=torch.float64))


def sigmas_of(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The model's sigma table, shape [T], increasing in t."""
    return sigma_from_abar(as_alphas_cumprod(alphas_cumprod))


def sigma_at(t: torch.Tensor | float, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma at a (possibly fractional) timestep, by linear interpolation of log sigma.

    Args:
        t: timesteps in [0, T-1], any shape.
        alphas_cumprod: abar table, shape [T].
    Returns:
        float64 tensor shaped like `t`.
    """
    log_sigmas = sigmas_of(alphas_cumprod).log()
    T = log_sigmas.numel()
    t = torch.as_tensor(t, dtype=torch.float64)
    if (t < 0).any() or (t > T - 1).any():
        raise StridelabError(f"timestep out of range [0, {T - 1}]: {t.min().item()}..{t.max().item()}")
    low = t.floor().long().clamp(max=T - 2)
    w = t - low
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp()


def abar_at(t: torch.Tensor | float, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """abar at a (possibly fractional) timestep; exact table values at integer t."""
    return abar_from_sigma(sigma_at(t, alphas_cumprod))


def t_from_sigma(sigma: torch.Tensor | float, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Fractional timestep whose interpolated sigma equals `sigma` (inverse of `sigma_at`).

    Sigmas outside the model's range are clamped to t = 0 or t = T-1.
    """
    log_sigmas = sigmas_of(alphas_cumprod).log()
    T = log_sigmas.numel()
    log_sigma = torch.as_tensor(sigma, dtype=torch.float64).log()
    log_sigma = log_sigma.clamp(log_sigmas[0], log_sigmas[-1])
    # Index of the table interval containing each value: log_sigmas[low] <= v <= log_sigmas[low + 1].
    low = (torch.searchsorted(log_sigmas, log_sigma.reshape(-1), right=True) - 1).clamp(0, T - 2)
    low = low.reshape(log_sigma.shape)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    return low + (log_sigma - lo) / (hi - lo)


def log_sigma_range(alphas_cumprod: torch.Tensor) -> tuple[float, float]:
    """(log sigma at t = 0, log sigma at t = T-1) of the model's table, python floats."""
    ls = sigmas_of(alphas_cumprod).log()
    return float(ls[0]), float(ls[-1])


def model_levels(abar: torch.Tensor, shift: torch.Tensor, alphas_cumprod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the model is asked when the steps integrate at levels abar [n]: log sigma_i + shift_i, clamped to
    the model's sigma range. Returns (t_model [n], abar_model [n]), float64, differentiable in abar and shift.

    The update itself keeps abar: a shift only changes which noise level the network is told it sees, the
    remedy TS-DDIM (Li et al., ICLR 2024) proposes for the exposure bias of few-step samplers."""
    lo, hi = log_sigma_range(alphas_cumprod)
    abar = abar.to(torch.float64)
    log_sigma = 0.5 * (torch.log1p(-abar) - abar.log()) + shift.to(torch.float64)
    sigma = log_sigma.clamp(lo, hi).exp()
    return t_from_sigma(sigma, alphas_cumprod), abar_from_sigma(sigma)
