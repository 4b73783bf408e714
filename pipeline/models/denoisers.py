"""Denoisers: everything a sampler can call, adapted once to one contract.

Contract (see `pipeline.solvers.ddim`): ``denoiser(x: Tensor[B, ...], t: LongTensor[B]) -> eps: Tensor[B, ...]``.
Every denoiser also carries ``alphas_cumprod`` (float64, shape [T]) so a sampler never has to assume a
noise schedule.

- `DiffusersDenoiser` wraps a diffusers UNet whose output is eps, v or x0 (``prediction_type``
  ``epsilon`` / ``v_prediction`` / ``sample``) and converts it to eps.
- `GaussianMixtureDenoiser` is an analytic model: data from a Gaussian mixture, the exact eps for every t.
  It makes closed-form tests and quick demos possible without any network.

Both also have ``eps_at_time(x, t, abar)``: eps at a *fractional* timestep t [B] (float) whose noise level
abar [B] the caller has interpolated (`pipeline.core.noise.abar_at`), with autograd on, so a loss can be
differentiated with respect to where the steps sit (`pipeline.evaluation.gradient`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, get_args

import torch

from pipeline.errors import StridelabError
from pipeline.core.noise import as_alphas_cumprod, make_alphas_cumprod

PredictionType = Literal["epsilon", "v_prediction", "sample"]
PREDICTION_TYPES: tuple[str, ...] = get_args(PredictionType)


def eps_from_prediction(
    output: torch.Tensor, x_t: torch.Tensor, abar_t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """Convert a model's output to eps.

    With x_t = sqrt(abar) x0 + sqrt(1 - abar) eps:
      - v_prediction (Salimans & Ho 2022): v = sqrt(abar) eps - sqrt(1 - abar) x0
        => eps = sqrt(abar) v + sqrt(1 - abar) x_t;
      - sample (x0): eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar).

    Args:
        abar_t: per-sample abar, shape [B] (broadcast over the other dims).
    """
    a = abar_t.reshape(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype)
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return a.sqrt() * output + (1 - a).sqrt() * x_t
    if prediction_type == "sample":
        return (x_t - a.sqrt() * output) / (1 - a).sqrt()
    raise StridelabError(f"unknown prediction_type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}")


class DiffusersDenoiser(torch.nn.Module):
    """A diffusers ``UNet2DModel`` (or any module returning ``.sample`` or a tensor) as an eps denoiser.

    The model runs in its own dtype/device (e.g. bf16 on a GPU); x and the returned eps stay in the
    caller's dtype, so the sampler's arithmetic is never done in half precision.

    Args:
        model: called as ``model(x, t)``.
        alphas_cumprod: the checkpoint's abar table, shape [T].
        prediction_type: what the model outputs.
    """

    def __init__(self, model: torch.nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise StridelabError(
                f"unknown prediction_type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}"
            )
        self.model = model
        self.prediction_type = prediction_type
        self.register_buffer("alphas_cumprod", as_alphas_cumprod(alphas_cumprod), persistent=False)

    def eps_at_time(self, x: torch.Tensor, t: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        """eps at fractional timesteps t [B] with noise levels abar [B], differentiable in x, t and abar.

        diffusers UNets embed a float timestep sinusoidally, so t need not be an integer.
        """
        p = next(self.model.parameters())
        out = self.model(x.to(p.device, p.dtype), t.to(p.device, torch.float32))
        out = getattr(out, "sample", out).to(x.device, x.dtype)
        if self.prediction_type == "epsilon":
            return out
        return eps_from_prediction(out, x, abar.to(x.device), self.prediction_type)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        p = next(self.model.parameters())
        out = self.model(x.to(p.device, p.dtype), t.to(p.device))
        out = getattr(out, "sample", out).to(x.device, x.dtype)
        if self.prediction_type == "epsilon":
            return out
        return eps_from_prediction(out, x, self.alphas_cumprod.to(x.device)[t.to(x.device)], self.prediction_type)


class GaussianMixtureDenoiser(torch.nn.Module):
    """Exact eps for data x0 ~ sum_k w_k N(mu_k, s_k^2 I) in D dimensions.

    Under x_t = sqrt(abar) x0 + sqrt(1 - abar) eps the marginal is a mixture of
    N(sqrt(abar) mu_k, v_k I) with v_k = abar s_k^2 + 1 - abar, so
    eps(x_t) = -sqrt(1 - abar) grad log p_t(x_t) = sqrt(1 - abar) sum_k r_k(x_t) (x_t - sqrt(abar) mu_k) / v_k
    with r_k the posterior component weights. Computed in float64, returned in x's dtype.

    Args:
        means: [K, D] component means.
        stds: [K] isotropic component standard deviations.
        weights: [K] mixture weights (normalised here).
        alphas_cumprod: abar table [T]; default diffusers' linear betas, T = 1000.
        sample_shape: the per-sample shape of x (prod = D), e.g. (1, 8, 8) to look like an image.
    """

    def __init__(
        self,
        means: torch.Tensor,
        stds: torch.Tensor | float,
        weights: torch.Tensor | None = None,
        alphas_cumprod: torch.Tensor | None = None,
        sample_shape: Sequence[int] | None = None,
    ):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise StridelabError(f"means must be [K, D], got shape {tuple(means.shape)}")
        K, D = means.shape
        stds = torch.as_tensor(stds, dtype=torch.float64).expand(K).clone()
        weights = torch.ones(K, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if (stds <= 0).any() or (weights <= 0).any() or weights.shape != (K,):
            raise StridelabError("mixture stds and weights must be positive, one per component")
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else (D,)
        if math.prod(self.sample_shape) != D:
            raise StridelabError(f"sample_shape {self.sample_shape} does not hold D = {D} values")
        self.register_buffer("means", means)
        self.register_buffer("stds", stds)
        self.register_buffer("weights", weights / weights.sum())
        abar = make_alphas_cumprod() if alphas_cumprod is None else as_alphas_cumprod(alphas_cumprod)
        self.register_buffer("alphas_cumprod", abar)

    def eps_at_abar(self, x: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        """eps for x [B, ...] at per-sample noise levels abar [B] (any values in (0, 1))."""
        B = x.shape[0]
        xf = x.reshape(B, -1).to(torch.float64)
        a = abar.to(torch.float64).reshape(B, 1, 1)
        centers = a.sqrt() * self.means.to(xf.device)[None]  # [B, K, D]
        var = a[..., 0] * self.stds.to(xf.device)[None] ** 2 + 1 - a[..., 0]  # [B, K]
        diff = xf[:, None, :] - centers  # [B, K, D]
        D = xf.shape[1]
        log_p = (
            self.weights.to(xf.device).log()[None]
            - 0.5 * (diff**2).sum(-1) / var
            - 0.5 * D * var.log()
        )
        r = torch.softmax(log_p, dim=1)  # [B, K]
        score = -(r[..., None] * diff / var[..., None]).sum(1)  # [B, D]
        eps = -(1 - a[:, 0]).sqrt() * score
        return eps.reshape(x.shape).to(x.dtype)

    def eps_at_time(self, x: torch.Tensor, t: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        """eps at noise levels abar [B] (t is not needed: the mixture's eps is a function of abar)."""
        return self.eps_at_abar(x, abar)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.eps_at_abar(x, self.alphas_cumprod.to(x.device)[t.to(x.device).long()])

    def sample_data(self, seeds: Sequence[int]) -> torch.Tensor:
        """Exact draws x0 from the mixture, one per seed, shape [B, *sample_shape] (float32)."""
        out = []
        for s in seeds:
            g = torch.Generator().manual_seed(int(s))
            k = torch.multinomial(self.weights, 1, generator=g).item()
            z = torch.randn(self.means.shape[1], generator=g, dtype=torch.float64)
            out.append(self.means[k] + self.stds[k] * z)
        return torch.stack(out).reshape(len(out), *self.sample_shape).float()


def _ring(k: int, radius: float, std: float, dim: int) -> tuple[torch.Tensor, float]:
    ang = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
    means = torch.zeros(k, dim, dtype=torch.float64)
    means[:, 0], means[:, 1] = radius * ang.cos(), radius * ang.sin()
    return means, std


def gaussian_mixture(name: str, alphas_cumprod: torch.Tensor | None = None) -> GaussianMixtureDenoiser:
    """Named analytic mixtures, used as ``gmm:<name>`` model specs.

    - ``ring8``: 8 components on a radius-2 circle in 2-D, std 0.1 (sharp modes: hard for few steps).
    - ``gauss``: one N(0.5, 0.2^2) in 64-D (the PF-ODE has a closed form; see tests).
    - ``blobs64``: 10 components in 64-D shaped [1, 8, 8], fixed random means, std 0.15 (digit-sized).
    """
    if name == "ring8":
        means, std = _ring(8, 2.0, 0.1, 2)
        return GaussianMixtureDenoiser(means, std, alphas_cumprod=alphas_cumprod)
    if name == "gauss":
        return GaussianMixtureDenoiser(torch.full((1, 64), 0.5), 0.2, alphas_cumprod=alphas_cumprod, sample_shape=(1, 8, 8))
    if name == "blobs64":
        g = torch.Generator().manual_seed(1234)
        means = torch.rand(10, 64, generator=g, dtype=torch.float64) * 2 - 1
        return GaussianMixtureDenoiser(means, 0.15, alphas_cumprod=alphas_cumprod, sample_shape=(1, 8, 8))
    raise StridelabError(f"unknown mixture {name!r}; choose one of {', '.join(GMM_NAMES)}")


GMM_NAMES: tuple[str, ...] = ("ring8", "gauss", "blobs64")
