"""DPM-Solver++ multistep, 2M and 3M (Lu et al. 2022, arXiv 2211.01095), data prediction, in lambda.

Notation (`pipeline.solvers.levels`): x is the VP sample, m_i = x0_pred at level i =
(x_i - sigma_vp_i eps_i) / alpha_i, lambda = log(alpha / sigma_vp), h = lambda_{i+1} - lambda_i > 0,
phi = -expm1(-h) = 1 - e^{-h}. One step from level i to i + 1 (paper eq. 13 / Algorithm 2):

    x_{i+1} = (sigma_vp_{i+1} / sigma_vp_i) x_i + alpha_{i+1} phi D

- order 1: D = m_i (DPM-Solver-1 = DDIM);
- order 2 ("midpoint"): D = m_i + (m_i - m_{i-1}) / (2 r0), r0 = h_{i-1} / h;
- order 3: with D1_0 = (m_i - m_{i-1}) / r0, D1_1 = (m_{i-1} - m_{i-2}) / r1, r1 = h_{i-2} / h,
  D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1) and
  x_{i+1} = ratio x_i + alpha_{i+1} [phi D0 + (1 - phi / h) D1 - ((h - phi) / h^2 - 1/2) D2].

Each step is expanded into ``c_x x + sum_k c_k m_{i-k}`` with python-float (float64) coefficients, so all
tensor work is per element. The step to clean data (sigma_vp = 0, h = inf) is x_0 = m_{n-1}.

Order per step: exactly diffusers' ``DPMSolverMultistepScheduler.step`` (0.42) with
``lower_order_final=True, final_sigmas_type="zero"`` (see `step_order`).

The 3M step is diffusers' (and the reference DPM-Solver code's) as written. With D2 ~ h^2 D''/2 its weight
-alpha phi_3 ~ alpha h / 6 is half what the Taylor term alpha h^3 D'' / 6 needs, so the local error keeps an
h^3 term: on Gaussian data with lambda-uniform steps it converges at order 2, not 3 (doubling the weight
gives >= 3; tests/test_solver_family.py). Kept, because the point is to be exactly what users run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from pipeline.solvers.levels import Levels, evaluate, levels_of, require_deterministic


def step_order(i: int, n: int, solver_order: int) -> int:
    """The order diffusers uses at step i of n (0-based): warm-up 1, 2, ...; the final step (to sigma = 0)
    is first order; with fewer than 15 steps the second-to-last is at most second order."""
    if i == 0 or i == n - 1:
        return 1
    if solver_order == 2 or i == 1 or (i == n - 2 and n < 15):
        return min(2, solver_order)
    return 3


def _expm1(h):
    """expm1 of a python float or a tensor (the coefficients below serve both)."""
    return torch.expm1(h) if isinstance(h, torch.Tensor) else math.expm1(h)


def step_coefficients(lam, alpha, sigma_vp, i: int, order: int) -> tuple:
    """(c_x, [c_0, c_1, ...]) with x_{i+1} = c_x x_i + sum_k c_k m_{i-k} (module docstring), i + 1 < n.

    `lam`, `alpha`, `sigma_vp` index the levels (python floats from `Levels`, or 1-D tensors from the
    differentiable solver `pipeline.evaluation.gradient`): one formula for both, so they cannot drift.
    """
    h = lam[i + 1] - lam[i]
    phi = -_expm1(-h)
    a_next = alpha[i + 1]
    c_x = sigma_vp[i + 1] / sigma_vp[i]
    if order == 1:
        return c_x, [a_next * phi]
    r0 = (lam[i] - lam[i - 1]) / h
    if order == 2:
        return c_x, [a_next * phi * (1 + 0.5 / r0), -a_next * phi * 0.5 / r0]
    r1 = (lam[i - 1] - lam[i - 2]) / h
    b = a_next * (1 - phi / h)  # coefficient of D1
    c = -a_next * ((h - phi) / h**2 - 0.5)  # coefficient of D2
    k = (b * r0 + c) / (r0 + r1)  # b D1 + c D2 = (b + k) D1_0 - k D1_1
    return c_x, [a_next * phi + (b + k) / r0, -(b + k) / r0 - k / r1, k / r1]


def _coefficients(lv: Levels, i: int, order: int) -> tuple[float, list[float]]:
    """`step_coefficients` on a run's python-float levels."""
    return step_coefficients(lv.lam, lv.alpha, lv.sigma_vp, i, order)


def dpmpp_multistep(denoiser, x_T, timesteps, alphas_cumprod, solver_order: int) -> torch.Tensor:
    """DPM-Solver++(2M) or (3M) over `timesteps` from x_T [B, ...] (n evaluations); returns x_0."""
    lv = levels_of(timesteps, alphas_cumprod)
    x = x_T
    m: list[torch.Tensor] = []  # data predictions, newest last (only the last solver_order are kept)
    for i, t_cur in enumerate(lv.timesteps):
        eps = evaluate(denoiser, x, t_cur)
        m = (m + [(x - lv.sigma_vp[i] * eps) * (1.0 / lv.alpha[i])])[-solver_order:]
        if i == lv.n - 1:
            return m[-1]  # h = inf: sigma_vp ratio 0, phi 1, alpha 1
        c_x, cs = _coefficients(lv, i, step_order(i, lv.n, solver_order))
        x_next = c_x * x
        for c, m_k in zip(cs, reversed(m)):
            x_next = x_next + c * m_k
        x = x_next
    raise AssertionError("unreachable: the last step returns")


@torch.no_grad()
def dpmpp_2m_sample(
    denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_T: torch.Tensor,
    timesteps: Sequence[int],
    alphas_cumprod: torch.Tensor,
    *,
    eta: float = 0.0,
    noise_sampler: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M), midpoint form; returns x_0 shaped like x_T [B, ...].

    The twin of diffusers ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
    solver_type="midpoint")`` with ``set_timesteps(timesteps=...)`` and of k-diffusion ``sample_dpmpp_2m``
    (same update: D = (1 + 1/(2r)) m_i - 1/(2r) m_{i-1}, first order on the first and the last step).
    """
    require_deterministic("dpmsolver++2m", eta)
    return dpmpp_multistep(denoiser, x_T, timesteps, alphas_cumprod, 2)


@torch.no_grad()
def dpmpp_3m_sample(
    denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_T: torch.Tensor,
    timesteps: Sequence[int],
    alphas_cumprod: torch.Tensor,
    *,
    eta: float = 0.0,
    noise_sampler: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """DPM-Solver++(3M); returns x_0 shaped like x_T [B, ...].

    The twin of diffusers ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=3)``
    with ``set_timesteps(timesteps=...)``; orders per step as `step_order` (1, 2, 3, ..., 3, [2,] 1).
    """
    require_deterministic("dpmsolver++3m", eta)
    return dpmpp_multistep(denoiser, x_T, timesteps, alphas_cumprod, 3)
