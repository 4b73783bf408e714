"""UniPC (Zhao et al. 2023, arXiv 2302.04867): UniP-2 predictor + UniC corrector, B(h) = e^h - 1 ("bh2").

Data prediction, in the notation of `pipeline.solvers.dpmsolver` (VP x, m_i = x0_pred at level i, lambda,
h, phi = -expm1(-h) = -B(h) with hh = -h). Step i (0-based, n steps):

1. evaluate eps at the current (predicted) x_i and m_i = x0_pred(x_i, eps_i);
2. UniC (i > 0; paper Algorithm 2 / eq. 9) re-does the last step from the corrected x_{i-1}, now with m_i:
   x_i <- (sigma_vp_i / sigma_vp_{i-1}) x_{i-1} + alpha_i phi (m_{i-1} + sum_k rho_k D_k), where
   D_0 = m_i - m_{i-1}, D_1 = (m_{i-2} - m_{i-1}) / r, r = (lambda_{i-2} - lambda_{i-1}) / h, and rho
   solves the B(h) order conditions (order p = the previous predictor's: p = 1: rho_0 = 1/2;
   p = 2: [[1, 1], [r, 1]] rho = [b_1, b_2], with b_1 = (phi_1(hh) - 1) / B, b_2 = 2 (b_1 B / hh - 1/2) / B
   and phi_1(hh) = expm1(hh) / hh);
3. UniP (order q = min(2, i + 1, n - i)): x_{i+1} = ratio x_i + alpha_{i+1} phi (m_i + q>1: (m_i - m_{i-1})
   / (2 r0)), r0 = h_{i-1} / h. With B = e^h - 1, UniP-2 is exactly DPM-Solver++(2M)'s midpoint step.

The model output stored for later steps is m_i at the *uncorrected* x_i (what the model saw), as in the
paper and diffusers; the corrector reuses it, so no extra evaluation: NFE = n. The last step is first order
to sigma = 0 (x_0 = m_{n-1}), which multiplies the corrected x_{n-1} by sigma_vp ratio 0: diffusers computes
that final correction and discards it; here it is skipped (same result).

This is exactly diffusers' ``UniPCMultistepScheduler(solver_order=2, solver_type="bh2", predict_x0=True,
lower_order_final=True, final_sigmas_type="zero", disable_corrector=[])`` (0.42) on the same levels.
ComfyUI's ``uni_pc_bh2`` is *stated*, not verified against its code, to be the same method (its sampler
derives from the UniPC authors' code with B(h) = e^h - 1); its warm-up and final-step rules may differ.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from pipeline.solvers.levels import Levels, evaluate, levels_of, require_deterministic


def _corrector_rho(h: float, r: float | None) -> tuple[float, float]:
    """(rho for D_0 = m_i - m_{i-1}, rho for D_1) of UniC-bh2: order 1 when r is None, else order 2."""
    if r is None:
        return 0.5, 0.0
    hh = -h
    big_b = math.expm1(hh)
    g1 = big_b / hh - 1  # h phi_2 ... in diffusers' recursion: h_phi_k after one step
    b1 = g1 / big_b
    b2 = 2 * (g1 / hh - 0.5) / big_b
    # [[1, 1], [r, 1]] (rho_1, rho_0) = (b1, b2); r < 0 (lambda increases), so 1 - r > 1.
    rho_1 = (b1 - b2) / (1 - r)
    return b1 - rho_1, rho_1


def _correct(lv: Levels, i: int, x_prev: torch.Tensor, m: list[torch.Tensor], order: int) -> torch.Tensor:
    """UniC at level i (i > 0): the corrected x_i from x_{i-1}; m = [..., m_{i-1}, m_i]."""
    h = lv.lam[i] - lv.lam[i - 1]
    phi = -math.expm1(-h)
    r = (lv.lam[i - 2] - lv.lam[i - 1]) / h if order == 2 else None
    rho_0, rho_1 = _corrector_rho(h, r)
    a = lv.alpha[i] * phi
    # alpha_i phi (m_{i-1} + rho_0 (m_i - m_{i-1}) + rho_1 (m_{i-2} - m_{i-1}) / r), expanded per m.
    out = (lv.sigma_vp[i] / lv.sigma_vp[i - 1]) * x_prev + (a * rho_0) * m[-1]
    if r is None:
        return out + (a * (1 - rho_0)) * m[-2]
    return out + (a * (1 - rho_0 - rho_1 / r)) * m[-2] + (a * rho_1 / r) * m[-3]


def _predict(lv: Levels, i: int, x: torch.Tensor, m: list[torch.Tensor], order: int) -> torch.Tensor:
    """UniP-bh2 from level i to i + 1 (i + 1 < n); m = [..., m_{i-1}, m_i]."""
    h = lv.lam[i + 1] - lv.lam[i]
    a = lv.alpha[i + 1] * -math.expm1(-h)
    out = (lv.sigma_vp[i + 1] / lv.sigma_vp[i]) * x
    if order == 1:
        return out + a * m[-1]
    half_over_r0 = 0.5 * h / (lv.lam[i] - lv.lam[i - 1])
    return out + (a * (1 + half_over_r0)) * m[-1] + (-a * half_over_r0) * m[-2]


@torch.no_grad()
def unipc_sample(
    denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_T: torch.Tensor,
    timesteps: Sequence[int],
    alphas_cumprod: torch.Tensor,
    *,
    eta: float = 0.0,
    noise_sampler: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """UniPC-bh2 (order-2 predictor, corrector on every step) from x_T [B, ...]; n evaluations; returns x_0."""
    require_deterministic("unipc", eta)
    lv = levels_of(timesteps, alphas_cumprod)
    x, x_prev, m = x_T, None, []
    prev_order = 0
    for i, t_cur in enumerate(lv.timesteps):
        eps = evaluate(denoiser, x, t_cur)
        m = (m + [(x - lv.sigma_vp[i] * eps) * (1.0 / lv.alpha[i])])[-3:]
        if i == lv.n - 1:
            return m[-1]  # first order to sigma = 0; the final correction would be multiplied by 0
        if i > 0:
            x = _correct(lv, i, x_prev, m, prev_order)
        prev_order = min(2, i + 1, lv.n - i)  # warm-up, and lower_order_final
        x_prev = x
        x = _predict(lv, i, x, m, prev_order)
    raise AssertionError("unreachable: the last step returns")
