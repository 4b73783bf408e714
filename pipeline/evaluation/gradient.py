"""The differentiable student: DDIM (eta = 0) or DPM-Solver++ 2M / 3M over continuous step times, its loss
against the teacher and the gradient of that loss with respect to where the steps sit (LD3, Tong et al.,
arXiv 2405.15506). `DIFFERENTIABLE` names the solvers that have a differentiable twin.

One pure function per piece, shared by the in-process optimiser (`search.placement.gradient`) and the Ray
actors (`pipeline.distributed.worker.SamplerWorker.gradient`), so both differentiate the same loss.

Notation (see also `pipeline.solvers.ddim` and `pipeline.core.noise`):

=============  =====================================================================  ==================
name           meaning                                                                LD3
=============  =====================================================================  ==================
``theta``      n + 1 logits; w = softmax(theta) are the gaps, in log sigma, between    xi (the learned
               sigma_max, the n steps and sigma_min: step i sits at                    discretisation)
               log sigma_i = log sigma_max - (w_0 + ... + w_i)(log sigma_max - log sigma_min)
``t_frac``     the steps as fractional timesteps [n], strictly decreasing, in (0, T-1)  t_i
``shift``      optional, [n]: where the model is asked, decoupled from where the step   (not in LD3; the
               integrates: the model sees log sigma_i + shift_i, the update uses        time-shift idea of
               sigma_i (`model_levels`; theta is then [2n + 1], logits then shift)      TS-DDIM, 2024)
``delta``      the student's input offset [B, ...]: the student starts from x_T + delta  x'_T - x_T
               (soft teacher forcing: delta stays in a ball, see `project_to_ball`)
``loss``       per seed: a distance between x0_student and x0_teacher, by default the   d(., .)
               mean over dimensions of their squared difference on the [0, 1] scale
               (``scale`` = 1 / (data_range width)); see `pipeline.evaluation.distances`
=============  =====================================================================  ==================

Any theta gives a valid placement (softmax gaps are positive and sum to 1, so the steps are strictly
decreasing and strictly inside the model's sigma range); the parametrisation cannot produce a collision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from pipeline.core.noise import abar_from_sigma, log_sigma_range, model_levels, sigmas_of, t_from_sigma
from pipeline.errors import StridelabError
from pipeline.evaluation.distances import Distance, per_seed_mse

# Smallest gap (fraction of the log-sigma range) an integer schedule is lifted to: the noisiest step of a
# uniform schedule sits exactly at sigma_max (gap 0), whose logit would be -inf.
MIN_GAP = 1e-3


def times_from_params(theta: torch.Tensor, alphas_cumprod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The n steps that logits theta [n + 1] place: (t_frac [n], abar [n]), float64, differentiable in theta.

    abar is the model's table interpolated linearly in log sigma (`pipeline.core.noise.sigma_at`), so at
    integer t it is exactly the trained level.
    """
    if theta.ndim != 1 or theta.numel() < 2:
        raise StridelabError(f"theta must be 1-D with n + 1 >= 2 entries, got shape {tuple(theta.shape)}")
    lo, hi = log_sigma_range(alphas_cumprod)
    gaps = torch.softmax(theta.to(torch.float64), dim=0)
    log_sigma = hi - torch.cumsum(gaps, dim=0)[:-1] * (hi - lo)
    sigma = log_sigma.exp()
    return t_from_sigma(sigma, alphas_cumprod), abar_from_sigma(sigma)


def split_params(theta: torch.Tensor, time_shift: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits [n + 1], shift [n] or None) of a parameter vector: [n + 1] plain, [2n + 1] with the time shift."""
    if not time_shift:
        return theta, None
    if theta.ndim != 1 or theta.numel() % 2 != 1 or theta.numel() < 3:
        raise StridelabError(f"with a time shift theta must be 1-D with 2n + 1 >= 3 entries, got shape {tuple(theta.shape)}")
    n = (theta.numel() - 1) // 2
    return theta[: n + 1], theta[n + 1:]


def levels_from_params(theta: torch.Tensor, alphas_cumprod: torch.Tensor, time_shift: bool = False):
    """(t_frac [n], abar [n], model_at) that theta places: model_at is None without the time shift, else
    `model_levels` of the steps (see `split_params`)."""
    logits, shift = split_params(theta, time_shift)
    t_frac, abar = times_from_params(logits, alphas_cumprod)
    return t_frac, abar, (None if shift is None else model_levels(abar, shift, alphas_cumprod))


def params_from_timesteps(timesteps: Sequence[float], alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Logits theta [n + 1] (float64) that place steps at `timesteps` (decreasing; gaps below `MIN_GAP` lifted)."""
    ls = sigmas_of(alphas_cumprod).log()
    lo, hi = float(ls[0]), float(ls[-1])
    t = torch.as_tensor([float(v) for v in timesteps], dtype=torch.float64)
    if t.numel() < 1 or (t[1:] >= t[:-1]).any():
        raise StridelabError("timesteps must be non-empty and strictly decreasing")
    low = t.floor().long().clamp(0, ls.numel() - 2)
    w = t - low
    log_sigma = (1 - w) * ls[low] + w * ls[low + 1]
    edges = torch.cat([torch.tensor([hi], dtype=torch.float64), log_sigma, torch.tensor([lo], dtype=torch.float64)])
    gaps = ((edges[:-1] - edges[1:]) / (hi - lo)).clamp(min=MIN_GAP)
    return (gaps / gaps.sum()).log()


def continuous_eps(denoiser, x: torch.Tensor, t: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """eps at one fractional timestep t (0-d) with level abar (0-d) for the batch x [B, ...], differentiable."""
    fn = getattr(denoiser, "eps_at_time", None)
    if fn is None:
        raise StridelabError(f"{type(denoiser).__name__} has no continuous-time eps (eps_at_time): gradient "
                             "placement supports the bundled, hub pixel and gmm models")
    B = x.shape[0]
    return fn(x, t.expand(B), abar.expand(B))


def ddim_continuous(denoiser, x_T: torch.Tensor, t_frac: torch.Tensor, abar: torch.Tensor,
                    model_at: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Deterministic DDIM (eta = 0, DDIM eq. 12) from x_T [B, ...] through levels abar [n] to abar = 1.

    The same update as `pipeline.solvers.ddim.ddim_step`, written on tensors so autograd reaches abar.
    `model_at`: (t [n], abar [n]) the network is evaluated at instead of (t_frac, abar) (`model_levels`).
    Returns x0 [B, ...] in x_T's dtype.
    """
    x = x_T
    n = abar.numel()
    t_m, a_m = model_at if model_at is not None else (t_frac, abar)
    for i in range(n):
        a_t = abar[i].to(x.dtype)
        eps = continuous_eps(denoiser, x, t_m[i], a_m[i])
        x0_pred = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        if i == n - 1:
            return x0_pred  # the jump to abar = 1 lands on x0_pred
        a_s = abar[i + 1].to(x.dtype)
        x = a_s.sqrt() * x0_pred + (1 - a_s).sqrt() * eps
    raise AssertionError("unreachable")


def ddim_invert_continuous(denoiser, x0: torch.Tensor, t_up: torch.Tensor, abar_up: torch.Tensor,
                           model_at: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Deterministic DDIM inversion (eta = 0) of data x0 [B, ...] up through levels abar_up [n] (least noisy first,
    fractional timesteps t_up [n]), differentiable: the tensor twin of `pipeline.solvers.ddim.ddim_invert`.

    Each jump to level i evaluates eps at the current point labelled with that level (the standard
    approximation eps(x_{i+1}) ~ eps(x_i), as `ddim_invert` and diffusers' DDIMInverseScheduler do), or at
    `model_at` (t [n], abar [n]): a per-step shift of that label (`model_levels`) can correct the
    approximation. Returns the code x_T [B, ...] at level abar_up[-1], in x0's dtype.
    """
    x = x0
    t_m, a_m = model_at if model_at is not None else (t_up, abar_up)
    a_prev = torch.ones((), dtype=torch.float64)
    for i in range(abar_up.numel()):
        a_i = abar_up[i].to(x.dtype)
        eps = continuous_eps(denoiser, x, t_m[i], a_m[i])
        x0_pred = (x - (1 - a_prev).to(x.dtype).sqrt() * eps) / a_prev.to(x.dtype).sqrt()
        x = a_i.sqrt() * x0_pred + (1 - a_i).sqrt() * eps
        a_prev = abar_up[i]
    return x


def dpmpp_multistep_continuous(denoiser, x_T: torch.Tensor, t_frac: torch.Tensor, abar: torch.Tensor,
                               solver_order: int = 2,
                               model_at: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """DPM-Solver++ (2M or 3M, data prediction) from x_T [B, ...] through levels abar [n] to abar = 1.

    The update of `pipeline.solvers.dpmsolver.dpmpp_multistep` on tensors, so autograd reaches abar and
    lambda: the same per-step orders (`step_order`) and the same coefficients (`step_coefficients`, one
    function for both). Levels (float64, [n]): alpha = sqrt(abar), sigma_vp = sqrt(1 - abar),
    lambda = log(alpha / sigma_vp). `model_at` as in `ddim_continuous`. Returns x0 [B, ...] in x_T's dtype (the
    last step lands on m_{n-1}).
    """
    from pipeline.solvers.dpmsolver import step_coefficients, step_order

    abar = abar.to(torch.float64)
    alpha, sigma_vp = abar.sqrt(), (1 - abar).sqrt()
    lam = 0.5 * (abar.log() - torch.log1p(-abar))
    x = x_T
    n = abar.numel()
    m: list[torch.Tensor] = []  # data predictions, newest last
    t_m, a_m = model_at if model_at is not None else (t_frac, abar)
    for i in range(n):
        eps = continuous_eps(denoiser, x, t_m[i], a_m[i])
        m = (m + [(x - sigma_vp[i].to(x.dtype) * eps) / alpha[i].to(x.dtype)])[-solver_order:]
        if i == n - 1:
            return m[-1]  # h = inf: sigma_vp ratio 0, phi 1, alpha 1
        c_x, cs = step_coefficients(lam, alpha, sigma_vp, i, step_order(i, n, solver_order))
        # coefficients are computed in float64 and applied in x's dtype (as the integer solver does)
        x_next = c_x.to(x.dtype) * x
        for c, m_k in zip(cs, reversed(m)):
            x_next = x_next + c.to(x.dtype) * m_k
        x = x_next
    raise AssertionError("unreachable: the last step returns")


def dpmpp_2m_continuous(denoiser, x_T: torch.Tensor, t_frac: torch.Tensor, abar: torch.Tensor,
                        model_at: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) over continuous levels (`dpmpp_multistep_continuous`, order 2)."""
    return dpmpp_multistep_continuous(denoiser, x_T, t_frac, abar, 2, model_at)


def dpmpp_3m_continuous(denoiser, x_T: torch.Tensor, t_frac: torch.Tensor, abar: torch.Tensor,
                        model_at: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """DPM-Solver++(3M) over continuous levels (`dpmpp_multistep_continuous`, order 3)."""
    return dpmpp_multistep_continuous(denoiser, x_T, t_frac, abar, 3, model_at)


DIFFERENTIABLE = {"ddim": ddim_continuous, "dpmsolver++2m": dpmpp_2m_continuous,
                  "dpmsolver++3m": dpmpp_3m_continuous}
"""Solver name (`pipeline.solvers.registry`) -> its differentiable twin
``fn(denoiser, x_T [B, ...], t_frac [n], abar [n], model_at=None) -> x0 [B, ...]``; at integer timesteps (and
no `model_at`) each equals the solver."""


def differentiable(solver: str):
    """The differentiable twin of `solver` (`DIFFERENTIABLE`); raises StridelabError listing the ones there are."""
    fn = DIFFERENTIABLE.get(solver)
    if fn is None:
        raise StridelabError(f"must be one of {', '.join(DIFFERENTIABLE)} for gradient placement (the solvers with a "
                             f"differentiable twin), got {solver!r}", param="solver")
    return fn


def sample_with_shift(denoiser, x_T: torch.Tensor, timesteps: Sequence[int], shift: Sequence[float] | None,
                      alphas_cumprod: torch.Tensor, solver: str = "ddim") -> torch.Tensor:
    """`solver` stepping through the integer `timesteps` [n] with the network asked at log sigma_i + shift_i
    (`model_levels`; no gradient). With no shift (or zeros) it is the solver itself. x_T [B, ...] -> x0 [B, ...]."""
    with torch.no_grad():
        return differentiable(solver)(denoiser, x_T, *integer_levels(timesteps, shift, alphas_cumprod, x_T.device))


def invert_with_shift(denoiser, x0: torch.Tensor, encode_timesteps: Sequence[int], shift: Sequence[float] | None,
                      alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """DDIM inversion of x0 [B, ...] up the integer, strictly increasing `encode_timesteps` [n] with the network told
    log sigma_i + shift_i at jump i (`model_levels`; no gradient). With no shift it is `ddim_invert` (to float
    tolerance). Returns the code [B, ...] at the last level."""
    with torch.no_grad():
        return ddim_invert_continuous(denoiser, x0, *integer_levels(encode_timesteps, shift, alphas_cumprod, x0.device))


def integer_levels(timesteps: Sequence[int], shift: Sequence[float] | None, alphas_cumprod: torch.Tensor,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """(t [n] as float64, abar [n], model_at or None) of integer `timesteps` on `device`: the continuous twins'
    arguments for steps at trained levels, the network asked at log sigma_i + shift_i (`model_levels`)."""
    ac = alphas_cumprod.to(torch.float64)
    t = torch.as_tensor([int(v) for v in timesteps], dtype=torch.long)
    abar = ac[t]
    model_at = None if shift is None else model_levels(abar, torch.as_tensor(list(shift), dtype=torch.float64), ac)
    if model_at is not None:
        model_at = tuple(v.to(device) for v in model_at)
    return t.to(torch.float64).to(device), abar.to(device), model_at


def round_trip_loss_and_grad(
    denoiser,
    x0: torch.Tensor,
    encode_timesteps: Sequence[int],
    decode_timesteps: Sequence[int],
    shifts: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    scale: float = 0.5,
) -> tuple[float, torch.Tensor, None]:
    """Sum over the images of the DDIM round trip's error and its gradient in the model time shifts.

    Args:
        x0: the images [B, ...] in the model's data range.
        encode_timesteps: the encoder's integer steps [n_e], strictly increasing, ending at decode_timesteps[0].
        decode_timesteps: the decoder's [n_d], strictly decreasing.
        shifts: [n_e + n_d] log-sigma shifts, the encoder's (least noisy first) then the decoder's
            (`INVERSE_MODEL_SHIFT_KEY`, `MODEL_SHIFT_KEY` of `pipeline.core.schedules`).
        scale: 1 / width of the data range: the error is the per-image MSE on the [0, 1] scale.
    Returns:
        (sum of per-image errors, d sum / d shifts [n_e + n_d] float64 CPU, None): a `GradFn` triple (no delta).
    """
    ac = alphas_cumprod.to(torch.float64)
    enc = torch.as_tensor([int(v) for v in encode_timesteps], dtype=torch.long)
    dec = torch.as_tensor([int(v) for v in decode_timesteps], dtype=torch.long)
    if shifts.ndim != 1 or shifts.numel() != enc.numel() + dec.numel():
        raise StridelabError(f"the round trip's shifts must be 1-D with {enc.numel()} + {dec.numel()} entries, got "
                             f"shape {tuple(shifts.shape)}")
    theta = shifts.detach().to(torch.float64).clone().requires_grad_(True)
    dev = x0.device
    with torch.enable_grad():
        s_enc, s_dec = theta[: enc.numel()], theta[enc.numel():]
        enc_at = tuple(v.to(dev) for v in model_levels(ac[enc], s_enc, ac))
        dec_at = tuple(v.to(dev) for v in model_levels(ac[dec], s_dec, ac))
        code = ddim_invert_continuous(denoiser, x0, enc.to(torch.float64).to(dev), ac[enc].to(dev), enc_at)
        rec = ddim_continuous(denoiser, code, dec.to(torch.float64).to(dev), ac[dec].to(dev), dec_at)
        loss = per_seed_mse(rec, x0, scale).sum()
        (grad,) = torch.autograd.grad(loss, [theta])
    return float(loss.detach()), grad.detach().cpu(), None


def shard_loss_and_grad(
    denoiser,
    x_T: torch.Tensor,
    x0_teacher: torch.Tensor,
    theta: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    *,
    delta: torch.Tensor | None = None,
    scale: float = 0.5,
    solver: str = "ddim",
    distance: Distance | None = None,
    time_shift: bool = False,
) -> tuple[float, torch.Tensor, torch.Tensor | None]:
    """Sum over the shard's seeds of the student's loss, and its gradients.

    Args:
        denoiser: has ``eps_at_time`` (`pipeline.models.denoisers`).
        x_T: the seeds' noise [B, ...]; x0_teacher: the teacher's outputs from it [B, ...].
        theta: logits [n + 1] (`times_from_params`), or [2n + 1] logits then shift with `time_shift`.
        delta: the student's input offsets [B, ...] (soft teacher forcing), or None (start at x_T).
        scale: 1 / width of the data range (0.5 for [-1, 1]): the loss is on the [0, 1] scale.
        solver: the student (a name in `DIFFERENTIABLE`).
        distance: per-seed ``d(x0_student, x0_teacher) -> [B]`` (`pipeline.evaluation.distances`); default the
            MSE on the [0, 1] scale given by `scale`.
        time_shift: theta carries the per-step model time shift (`model_levels`).
    Returns:
        (sum of per-seed losses, d sum / d theta (theta's shape) float64 CPU, d sum / d delta [B, ...] CPU or None).
        Sums, not means, so shards add up exactly and the driver divides once by the seed count.
    """
    student = differentiable(solver)
    theta = theta.detach().to(torch.float64).clone().requires_grad_(True)
    leaves = [theta]
    x_in = x_T
    if delta is not None:
        delta = delta.detach().to(x_T.device, x_T.dtype).clone().requires_grad_(True)
        leaves.append(delta)
        x_in = x_T + delta
    with torch.enable_grad():
        t_frac, abar, model_at = levels_from_params(theta, alphas_cumprod, time_shift)
        if model_at is not None:
            model_at = tuple(v.to(x_T.device) for v in model_at)
        x0 = student(denoiser, x_in, t_frac.to(x_T.device), abar.to(x_T.device), model_at)
        target = x0_teacher.to(x0.device, x0.dtype)
        loss = (distance(x0, target) if distance is not None else per_seed_mse(x0, target, scale)).sum()
        grads = torch.autograd.grad(loss, leaves)
    g_delta = grads[1].detach().cpu() if delta is not None else None
    return float(loss.detach()), grads[0].detach().cpu(), g_delta


def project_to_ball(delta: torch.Tensor, radius: float) -> torch.Tensor:
    """Each row of delta [B, ...] scaled back into the ball ||delta_b|| <= radius * sqrt(D) (D = dims per row).

    The radius is in units of the noise's per-dimension standard deviation (x_T ~ N(0, I)): radius r lets the
    student start anywhere within r * sqrt(D) of x_T, the typical length of r times a fresh noise vector.
    """
    if radius < 0 or not math.isfinite(radius):
        raise StridelabError(f"must be a finite number >= 0, got {radius}", param="radius")
    D = delta[0].numel() if delta.shape[0] else 1
    bound = radius * math.sqrt(D)
    norms = delta.flatten(1).norm(dim=1).clamp(min=1e-30)
    factor = (bound / norms).clamp(max=1.0)
    return delta * factor.reshape(-1, *([1] * (delta.ndim - 1)))
