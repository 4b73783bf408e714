"""In-process evaluation of schedules on a model: the reference the Ray pool must reproduce.

Every schedule is evaluated on the same seeds: sample i starts from the same x_T (seed i) under every
schedule, so differences are the schedule's alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipeline.solvers.ddim import ddim_sample
from pipeline.metrics.recon import inversion_errors, per_sample_mse, recon_errors
from pipeline.models.load import LoadedModel
from pipeline.core.schedules import Schedule, uniform
from pipeline.core.seeds import initial_noise


@dataclass(frozen=True)
class Teacher:
    """Many-step DDIM outputs for a fixed seed set: the target of the recon metric.

    Attributes:
        seeds: the seeds, in order.
        x_T: starting noise [B, ...] (seed i -> row i).
        x0: teacher outputs [B, ...].
        nfe: teacher steps (uniform stride).
        timesteps: the teacher's schedule (uniform with `nfe` steps).
    """

    seeds: tuple[int, ...]
    x_T: torch.Tensor
    x0: torch.Tensor
    nfe: int
    timesteps: tuple[int, ...]


def make_teacher(model: LoadedModel, seeds: Sequence[int], nfe: int | None = None, batch_size: int = 512) -> Teacher:
    """Run the teacher (uniform DDIM with `nfe` steps, default every training timestep)."""
    T = model.num_train_timesteps
    nfe = T if nfe is None else nfe
    ts = uniform(nfe, model.alphas_cumprod).timesteps
    x_T, _ = initial_noise(seeds, model.sample_shape)
    outs = [
        ddim_sample(model.denoiser, x_T[i : i + batch_size], ts, model.alphas_cumprod)
        for i in range(0, len(seeds), batch_size)
    ]
    return Teacher(tuple(int(s) for s in seeds), x_T, torch.cat(outs), nfe, tuple(ts))


def evaluate_schedule(
    model: LoadedModel,
    schedule: Schedule,
    teacher: Teacher,
    data_x0: torch.Tensor | None = None,
) -> dict[str, float]:
    """Mean recon MSE vs the teacher (and inversion round-trip MSE when data is given), [0, 1] scale."""
    rec = recon_errors(model.denoiser, teacher.x_T, schedule.timesteps, model.alphas_cumprod, teacher.x0, model.to_unit)
    out = {"recon": rec.mean().item(), "recon_sem": (rec.std() / rec.numel() ** 0.5).item() if rec.numel() > 1 else 0.0}
    if data_x0 is not None:
        inv = inversion_errors(model.denoiser, data_x0, schedule.timesteps, model.alphas_cumprod, model.to_unit)
        out["inversion"] = inv.mean().item()
    return out


@dataclass(frozen=True)
class ScheduleResult:
    """Metrics of one schedule on one seed set.

    Attributes:
        schedule: the schedule evaluated.
        recon: per-seed recon MSE vs the teacher, shape [B] (same seed order as the teacher), [0,1] scale.
        inversion: per-seed inversion round-trip MSE [B], or None when the model cannot draw data.
        seconds: wall time spent sampling.
        extra: other metrics (e.g. "fid", "kid") as floats.
    """

    schedule: Schedule
    recon: torch.Tensor
    inversion: torch.Tensor | None = None
    seconds: float = 0.0
    extra: dict[str, float] | None = None

    def summary(self) -> dict[str, float]:
        out = {"recon": self.recon.mean().item()}
        if self.inversion is not None:
            out["inversion"] = self.inversion.mean().item()
        out.update(self.extra or {})
        return out


class InProcessEvaluator:
    """Evaluates schedules in this process on a fixed seed set; the reference for distributed evaluators.

    Any evaluator (this one, the Ray actor pool) has the same method:
    ``evaluate(schedules) -> list[ScheduleResult]``, results in the order of `schedules`, each computed
    on the evaluator's seeds against its teacher.
    """

    def __init__(self, model: LoadedModel, seeds: Sequence[int], teacher_nfe: int | None = None, inversion: bool = False):
        self.model = model
        self.teacher = make_teacher(model, seeds, teacher_nfe)
        sample_data = getattr(model.denoiser, "sample_data", None)
        self.data = sample_data(seeds) if (inversion and sample_data is not None) else None

    def evaluate(self, schedules: Sequence[Schedule]) -> list[ScheduleResult]:
        import time

        out = []
        for s in schedules:
            t0 = time.perf_counter()
            if tuple(s.timesteps) == self.teacher.timesteps:  # the teacher itself: exactly zero, nothing to sample
                x0 = self.model.to_unit(self.teacher.x0)
                rec = per_sample_mse(x0, x0)
            else:
                rec = recon_errors(self.model.denoiser, self.teacher.x_T, s.timesteps, self.model.alphas_cumprod,
                                   self.teacher.x0, self.model.to_unit)
            inv = None
            if self.data is not None:
                inv = inversion_errors(self.model.denoiser, self.data, s.timesteps, self.model.alphas_cumprod,
                                       self.model.to_unit)
            out.append(ScheduleResult(s, rec, inv, time.perf_counter() - t0))
        return out
