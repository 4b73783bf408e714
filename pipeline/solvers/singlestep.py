"""Euler and Heun on the probability-flow ODE in sigma (Karras et al. 2022, "EDM", Algorithm 1 with no churn).

In x~ = x / sqrt(abar) and sigma = sqrt((1 - abar) / abar) (`pipeline.solvers.levels`) the PF-ODE of an
eps model is dx~/dsigma = eps(x~ / sqrt(1 + sigma^2), t(sigma)) (EDM eq. 4 with s = 1): the derivative
*is* the predicted noise, ``(x~ - x0_pred) / sigma`` in diffusers' and k-diffusion's spelling.

- Euler: x~_{i+1} = x~_i + (sigma_{i+1} - sigma_i) eps_i. In exact arithmetic this is DDIM with eta = 0
  (the Euler step in these coordinates is DDIM's update); it is kept as its own function because it is
  the twin of ``EulerDiscreteScheduler`` / ``sample_euler``, whose float rounding follows this form.
- Heun: the Euler step, then the trapezoidal correction with eps at the Euler point at the *next listed*
  timestep: x~_{i+1} = x~_i + (sigma_{i+1} - sigma_i) (eps_i + eps'_{i+1}) / 2. The step to sigma = 0
  stays Euler (there is no eps at clean data), so n steps cost 2n - 1 evaluations.

Shapes: x_T and the result are [B, ...]; each model call sees [B, ...] and LongTensor[B] (one listed t).
The model input is x~ sqrt(abar) (the VP sample); at the first step it is x_T itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pipeline.solvers.levels import evaluate, levels_of, require_deterministic


def _pf_ode_run(denoiser, x_T, timesteps, alphas_cumprod, *, heun: bool) -> torch.Tensor:
    """Euler (heun=False) or Heun (heun=True) in (x~, sigma), from VP noise x_T at level timesteps[0]."""
    lv = levels_of(timesteps, alphas_cumprod)
    x = x_T / lv.alpha[0]  # x~ at sigma_0
    x_in = x_T  # the model input (VP sample) at the current level
    for i, t_cur in enumerate(lv.timesteps):
        eps = evaluate(denoiser, x_in, t_cur)
        dsigma = lv.sigma[i + 1] - lv.sigma[i]
        x_euler = x + dsigma * eps
        if heun and i + 1 < lv.n:
            # Corrector: the derivative at the Euler point, at the next listed timestep (never a fractional t).
            eps_next = evaluate(denoiser, x_euler * lv.alpha[i + 1], lv.timesteps[i + 1])
            x = x + dsigma * ((eps + eps_next) * 0.5)
        else:
            x = x_euler
        x_in = x * lv.alpha[i + 1]
    return x  # sigma = 0: x~ = x_0


@torch.no_grad()
def euler_sample(
    denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_T: torch.Tensor,
    timesteps: Sequence[int],
    alphas_cumprod: torch.Tensor,
    *,
    eta: float = 0.0,
    noise_sampler: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Euler on the PF-ODE in sigma over `timesteps` (n evaluations); returns x_0 shaped like x_T [B, ...].

    The twin of diffusers ``EulerDiscreteScheduler`` with ``set_timesteps(sigmas=[sigma(t_0), ..., 0])``
    and of k-diffusion ``sample_euler`` (s_churn = 0).
    """
    require_deterministic("euler", eta)
    return _pf_ode_run(denoiser, x_T, timesteps, alphas_cumprod, heun=False)


@torch.no_grad()
def heun_sample(
    denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_T: torch.Tensor,
    timesteps: Sequence[int],
    alphas_cumprod: torch.Tensor,
    *,
    eta: float = 0.0,
    noise_sampler: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Heun (EDM Algorithm 1) over `timesteps` (2n - 1 evaluations); returns x_0 shaped like x_T [B, ...].

    The twin of diffusers ``HeunDiscreteScheduler`` with ``set_timesteps(timesteps=...)`` and of
    k-diffusion ``sample_heun`` (s_churn = 0).
    """
    require_deterministic("heun", eta)
    return _pf_ode_run(denoiser, x_T, timesteps, alphas_cumprod, heun=True)
