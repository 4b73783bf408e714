"""Samplers over an explicit timestep list. DDIM (eta, inversion) is the core, the teacher and the inverter."""

from __future__ import annotations

from pipeline.solvers.ddim import ddim_invert, ddim_sample, ddim_step

__all__ = ["ddim_invert", "ddim_sample", "ddim_step"]
