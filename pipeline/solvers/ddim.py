"""DDIM (Song, Meng & Ermon, ICLR 2021) for an arbitrary, explicit timestep list.

Unlike diffusers' ``DDIMScheduler.step`` (which derives the next timestep as ``t - T // N`` and so
silently mis-steps on any non-uniform list), the step after ``timesteps[i]`` is always
``timesteps[i + 1]``, and the step after the last listed timestep goes to abar = 1 (clean data, as
``set_alpha_to_one=True`` in diffusers).

Notation (the same names are used across stridelab):

=================  =====================================================  ===============================
name               meaning                                                paper / diffusers
=================  =====================================================  ===============================
``x_t``            current sample at timestep t, shape [B, ...]           x_t / ``sample``
``eps``            predicted noise eps_theta(x_t, t)                      eps_theta / ``model_output``
``alpha_bar_t``    abar_t, cumulative product of (1 - beta)              alpha_t (DDIM) / ``alphas_cumprod``
``alpha_bar_s``    abar at the next (less noisy) timestep s < t           alpha_{t-1} / ``alpha_prod_t_prev``
``x0_pred``        (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)            f_theta / ``pred_original_sample``
``sigma``          eta sqrt((1-abar_s)/(1-abar_t)) sqrt(1-abar_t/abar_s)  sigma_t(eta) / ``std_dev_t``
``x_s``            sqrt(abar_s) x0_pred + sqrt(1-abar_s-sigma^2) eps      x_{t-1} / ``prev_sample``
                   + sigma z
=================  =====================================================  ===============================

eta = 0 is the deterministic sampler (an Euler step of the probability-flow ODE in the
(sigma, x / sqrt(abar)) coordinates); eta = 1 is the DDPM posterior (ancestral) step.

Denoiser contract: ``denoiser(x: Tensor[B, ...], t: LongTensor[B]) -> eps: Tensor[B, ...]``
(see `pipeline.models.denoisers` for the adapter that turns any diffusers model into one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from pipeline.errors import StridelabError
from pipeline.core.noise import as_alphas_cumprod
from pipeline.core.schedules import validate_timesteps
from pipeline.core.seeds import randn_per_sample


class Denoiser(Protocol):
    """eps-prediction model: ``(x: Tensor[B, ...], t: LongTensor[B]) -> eps: Tensor[B, ...]``."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


NoiseSampler = Callable[[int, torch.Tensor], torch.Tensor]
"""``noise_sampler(i, x) -> z`` gives the standard-normal noise for step i, shaped like x."""


def ddim_sigma(alpha_bar_t: float, alpha_bar_s: float, eta: float) -> float:
    """sigma_t(eta) = eta sqrt((1 - abar_s)/(1 - abar_t)) sqrt(1 - abar_t/abar_s) (DDIM eq. 16)."""
    return eta * ((1 - alpha_bar_s) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_s)) ** 0.5


def ddim_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    alpha_bar_t: float,
    alpha_bar_s: float,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update from noise level abar_t to abar_s (DDIM eq. 12).

    Args:
        x_t: current sample, shape [B, ...].
        eps: predicted noise at (x_t, t), same shape.
        alpha_bar_t, alpha_bar_s: abar at the current and next level (python floats; float64 precision
            matters near abar = 1). abar_s > abar_t samples, abar_s < abar_t inverts (eta must be 0).
        eta: 0 deterministic, 1 DDPM posterior.
        noise: standard-normal z shaped like x_t; required when sigma > 0.
    Returns:
        (x_s, x0_pred), both shaped like x_t.
    """
    a_t, a_s = float(alpha_bar_t), float(alpha_bar_s)
    x0_pred = (x_t - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    sigma = ddim_sigma(a_t, a_s, eta) if eta > 0 else 0.0
    # max(., 0): 1 - abar_s - sigma^2 is exactly 0 in theory at eta = 1 on consecutive steps, and can
    # round to a tiny negative number.
    x_s = a_s**0.5 * x0_pred + max(1 - a_s - sigma**2, 0.0) ** 0.5 * eps
    if sigma > 0:
        if noise is None:
            raise StridelabError("ddim_step: eta > 0 needs `noise` (or a generator in ddim_sample)")
        x_s = x_s + sigma * noise
    return x_s, x0_pred


def _timestep_batch(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)


def noise_sampler_from(
    generator: torch.Generator | Sequence[torch.Generator] | None, x: torch.Tensor
) -> NoiseSampler | None:
    """A `NoiseSampler` drawing from one generator for the batch, or one per sample (row i from gens[i])."""
    if generator is None:
        return None
    if isinstance(generator, torch.Generator):
        return lambda i, x_: randn_per_sample(generator, x_.shape, device=x_.device, dtype=x_.dtype)
    gens = list(generator)
    if len(gens) != x.shape[0]:
        raise StridelabError(f"got {len(gens)} generators for a batch of {x.shape[0]} samples")
    return lambda i, x_: randn_per_sample(gens, x_.shape[1:], device=x_.device, dtype=x_.dtype)


@torch.no_grad()
def ddim_sample(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    timesteps: Sequence[int],
    alphas_cumprod: torch.Tensor,
    eta: float = 0.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """Run DDIM through `timesteps` and return x_0.

    Args:
        denoiser: eps model, ``(x [B, ...], t LongTensor[B]) -> eps``.
        x_T: starting noise at level abar[timesteps[0]], shape [B, ...] (typically N(0, I)).
        timesteps: strictly decreasing ints in [0, T-1]; len = NFE.
        alphas_cumprod: abar table, shape [T].
        eta: stochasticity in [0, 1].
        generator: for eta > 0, one generator for the whole batch or a list with one per sample
            (per-sample lists make sample i independent of batch composition).
        callback: called after each step with ``{"i", "t", "t_next", "x", "x0_pred"}``.
        noise_sampler: alternative to `generator`: ``(i, x) -> z``.
    Returns:
        x_0, shape of x_T.
    """
    if not 0.0 <= eta <= 1.0:
        raise StridelabError(f"eta must be in [0, 1], got {eta}")
    abar = as_alphas_cumprod(alphas_cumprod)
    ts = validate_timesteps(timesteps, abar.numel())
    noise_sampler = noise_sampler or noise_sampler_from(generator, x_T)
    if eta > 0 and noise_sampler is None:
        raise StridelabError("eta > 0 needs a generator (or noise_sampler) for the per-step noise")

    x = x_T
    for i, t_cur in enumerate(ts):
        t_next = ts[i + 1] if i + 1 < len(ts) else -1  # -1: the final jump to abar = 1
        a_cur = abar[t_cur].item()
        a_next = abar[t_next].item() if t_next >= 0 else 1.0
        eps = denoiser(x, _timestep_batch(t_cur, x)).to(x.dtype)
        # Noise is drawn only where it is used (sigma > 0), so the final step consumes none.
        sigma = ddim_sigma(a_cur, a_next, eta) if eta > 0 else 0.0
        z = noise_sampler(i, x) if sigma > 0 else None
        x, x0_pred = ddim_step(x, eps, a_cur, a_next, eta=eta, noise=z)
        if callback is not None:
            callback({"i": i, "t": t_cur, "t_next": t_next, "x": x, "x0_pred": x0_pred})
    return x


@torch.no_grad()
def ddim_invert(
    denoiser: Denoiser,
    x_0: torch.Tensor,
    timesteps: Sequence[int],
    alphas_cumprod: torch.Tensor,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> torch.Tensor:
    """DDIM inversion (eta = 0): encode clean data x_0 to x_T.

    Takes the same strictly decreasing schedule that `ddim_sample` would decode with and walks it in
    increasing order: clean (abar = 1) -> timesteps[-1] -> ... -> timesteps[0]. Each jump to timestep u
    evaluates eps at the current point with u as its time label (the standard approximation, as in
    diffusers' DDIMInverseScheduler), so ``ddim_sample(ddim_invert(x0, ts), ts) ~ x0`` with an error
    that vanishes as NFE grows.

    Args:
        x_0: clean samples, shape [B, ...].
        timesteps: strictly decreasing ints in [0, T-1].
    Returns:
        x_T at level abar[timesteps[0]], shape of x_0.
    """
    abar = as_alphas_cumprod(alphas_cumprod)
    ts = validate_timesteps(timesteps, abar.numel())
    x = x_0
    a_prev = 1.0
    for i, t_up in enumerate(reversed(ts)):
        a_up = abar[t_up].item()
        eps = denoiser(x, _timestep_batch(t_up, x)).to(x.dtype)
        x, x0_pred = ddim_step(x, eps, a_prev, a_up, eta=0.0)
        if callback is not None:
            callback({"i": i, "t": t_up, "x": x, "x0_pred": x0_pred})
        a_prev = a_up
    return x
