"""Model specs and loading, the denoiser adapters (eps / v / sample -> eps), analytic mixtures, latent models, the bundled assets and their data."""

from __future__ import annotations

from pipeline.models.load import LoadedModel, load_model

__all__ = ["LoadedModel", "load_model"]
