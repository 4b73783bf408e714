"""iPNDM: improved pseudo linear multistep (Zhang & Chen 2023, "DEIS", arXiv 2204.13902, Sec. 4 / App.).

Adams-Bashforth on the PF-ODE in DDIM's coordinates (`pipeline.solvers.singlestep`): with x~ = x / sqrt(abar)
and sigma = sqrt((1 - abar) / abar), dx~/dsigma = eps, so

    x~_{i+1} = x~_i + (sigma_{i+1} - sigma_i) * sum_j c_j eps_{i-j}

with the *fixed* (equal-step) Adams-Bashforth coefficients of order q = min(i + 1, 4) (lower-order warm-up
on the first three steps; no lower-order final step):

    q = 1: (1)        q = 2: (3, -1) / 2        q = 3: (23, -16, 5) / 12        q = 4: (55, -59, 37, -9) / 24

Fixed coefficients on a non-uniform grid are what makes it "pseudo"; the DEIS paper finds this works
well in practice. One evaluation per step (NFE = n); the model sees only the listed integer timesteps.

No diffusers scheduler takes an explicit list for it (``IPNDMScheduler`` / ``PNDMScheduler`` /
``LMSDiscreteScheduler`` take only a step count), so it is checked against closed forms and the teacher.
ComfyUI's sampler named ``ipndm`` is stated (from its formula, *not* tested against ComfyUI's code) to
use these fixed coefficients on the eps-derivative in sigma.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pipeline.solvers.levels import evaluate, levels_of, require_deterministic

AB_COEFFICIENTS: tuple[tuple[float, ...], ...] = (
    (1.0,),
    (3 / 2, -1 / 2),
    (23 / 12, -16 / 12, 5 / 12),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)
"""Adams-Bashforth coefficients of orders 1..4, newest eps first."""


@torch.no_grad()
def ipndm_sample(
    denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_T: torch.Tensor,
    timesteps: Sequence[int],
    alphas_cumprod: torch.Tensor,
    *,
    eta: float = 0.0,
    noise_sampler: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """iPNDM (order up to 4) from VP noise x_T [B, ...] over `timesteps`; n evaluations; returns x_0."""
    require_deterministic("ipndm", eta)
    lv = levels_of(timesteps, alphas_cumprod)
    x = x_T / lv.alpha[0]  # x~
    x_in = x_T
    history: list[torch.Tensor] = []  # eps, newest first (at most 4)
    for i, t_cur in enumerate(lv.timesteps):
        history = [evaluate(denoiser, x_in, t_cur)] + history[:3]
        coefs = AB_COEFFICIENTS[len(history) - 1]
        slope = coefs[0] * history[0]
        for c, e in zip(coefs[1:], history[1:]):
            slope = slope + c * e
        x = x + (lv.sigma[i + 1] - lv.sigma[i]) * slope
        x_in = x * lv.alpha[i + 1]
    return x  # sigma = 0: x~ = x_0
