"""Sample-quality metrics for a schedule: pure functions of tensors.

All errors are per-dimension mean squared errors on a [0, 1] image scale (the DDIM paper's Table 2
convention), so numbers are comparable across models with different data ranges.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pipeline.solvers.ddim import Denoiser, ddim_invert, ddim_sample


def per_sample_mse(a01: torch.Tensor, b01: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error, shape [B], of two batches already on the [0, 1] scale."""
    return ((a01.double() - b01.double()) ** 2).flatten(1).mean(1)


def recon_sem(errors: torch.Tensor) -> float:
    """Standard error of the mean of per-sample errors [B]: std / sqrt(B) (0 for a single sample)."""
    return (errors.std() / errors.numel() ** 0.5).item() if errors.numel() > 1 else 0.0


def recon_errors(
    denoiser: Denoiser,
    x_T: torch.Tensor,
    timesteps: Sequence[int],
    alphas_cumprod: torch.Tensor,
    teacher_x0: torch.Tensor,
    to_unit: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Per-sample MSE [B] between the n-step DDIM output and the teacher's output from the same x_T."""
    x0 = ddim_sample(denoiser, x_T, timesteps, alphas_cumprod)
    return per_sample_mse(to_unit(x0), to_unit(teacher_x0))


def inversion_errors(
    denoiser: Denoiser,
    x_0: torch.Tensor,
    timesteps: Sequence[int],
    alphas_cumprod: torch.Tensor,
    to_unit: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """DDIM paper Table 2 protocol: encode data x_0 with the schedule, decode with it, per-sample MSE [B]."""
    x_T = ddim_invert(denoiser, x_0, timesteps, alphas_cumprod)
    x_rec = ddim_sample(denoiser, x_T, timesteps, alphas_cumprod)
    return per_sample_mse(to_unit(x_rec), to_unit(x_0))
