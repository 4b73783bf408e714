"""Reuse elsewhere: a diffusers pipeline run on a schedule (`sample_with_schedule`), diffusers schedulers
(`timesteps=` / `sigmas=`), k-diffusion and ComfyUI sigma lists, the drop-in DDIM schedulers (forward and inverse)."""

from __future__ import annotations

from pipeline.interop.apply import apply_schedule
from pipeline.interop.reuse import scheduler_for_schedule
from pipeline.interop.sigma_lists import comfyui_sigma_string, k_diffusion_sigmas
from pipeline.interop.ddim_scheduler import StrideDDIMScheduler
from pipeline.interop.ddim_inverse_scheduler import StrideDDIMInverseScheduler
from pipeline.interop.pipelines import sample_with_schedule

__all__ = ["StrideDDIMInverseScheduler", "StrideDDIMScheduler", "apply_schedule", "comfyui_sigma_string", "k_diffusion_sigmas",
           "sample_with_schedule", "scheduler_for_schedule"]
