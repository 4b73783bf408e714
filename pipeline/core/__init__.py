"""Core numerics: noise tables, timestep validation, `Schedule` and the baseline spacings, per-sample seeds, the error type."""

from __future__ import annotations

from pipeline.errors import StridelabError
from pipeline.core.schedules import SCHEDULES, Schedule, make_schedule, validate_timesteps
from pipeline.core.seeds import initial_noise

__all__ = ["SCHEDULES", "Schedule", "StridelabError", "initial_noise", "make_schedule", "validate_timesteps"]
