"""Reuse elsewhere: diffusers schedulers (`timesteps=` / `sigmas=`), k-diffusion and ComfyUI sigma lists, the drop-in DDIM scheduler."""

from __future__ import annotations

from pipeline.interop.apply import apply_schedule, comfyui_sigma_string, k_diffusion_sigmas, scheduler_for_schedule
from pipeline.interop.ddim_scheduler import StrideDDIMScheduler

__all__ = ["StrideDDIMScheduler", "apply_schedule", "comfyui_sigma_string", "k_diffusion_sigmas", "scheduler_for_schedule"]
