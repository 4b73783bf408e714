"""One loader for every model a sweep can run on, from a spec string.

Specs:
    gmm:<name>        analytic Gaussian mixture (`pipeline.denoisers.gaussian_mixture`)

Every model comes back as a `LoadedModel`: an eps denoiser (the contract of `pipeline.ddim`), the
checkpoint's own ``alphas_cumprod`` (never assumed) and the per-sample shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.denoisers import gaussian_mixture
from pipeline.errors import StridelabError


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to sample.

    Attributes:
        spec: the spec string it was loaded from (used as the model id in exports).
        denoiser: ``(x [B, *sample_shape], t LongTensor[B]) -> eps``.
        alphas_cumprod: float64 [T] abar table from the checkpoint.
        sample_shape: per-sample shape of x, e.g. (1, 8, 8).
        data_range: the (low, high) of clean data, to map samples to [0, 1] for metrics and images.
    """

    spec: str
    denoiser: torch.nn.Module
    alphas_cumprod: torch.Tensor
    sample_shape: tuple[int, ...]
    data_range: tuple[float, float] = (-1.0, 1.0)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.numel())

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Map clean samples from `data_range` to [0, 1] (not clipped)."""
        lo, hi = self.data_range
        return (x - lo) / (hi - lo)


def load_model(spec: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a model from a spec string; see the module docstring for the schemes."""
    scheme, _, rest = spec.partition(":")
    if scheme == "gmm" and rest:
        d = gaussian_mixture(rest).to(device)
        return LoadedModel(spec, d, d.alphas_cumprod.cpu(), d.sample_shape, data_range=(-1.0, 1.0))
    raise StridelabError(f"unknown model spec {spec!r}; use gmm:<name>")
