"""In-process evaluation of schedules on a model: the reference the Ray pool must reproduce.

Every schedule is evaluated on the same seeds: sample i starts from the same x_T (seed i) under every
schedule, so differences are the schedule's alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from pipeline.core.batching import DEFAULT_FORWARD_BATCH, BatchInvariant, run_fixed_batches
from pipeline.solvers.ddim import Denoiser
from pipeline.solvers.registry import DEFAULT_SOLVER, solve
from pipeline.errors import StridelabError
from pipeline.metrics.recon import RoundTrip, per_sample_mse, recon_sem, round_trip
from pipeline.metrics.teacher import run_teacher, teacher_timesteps
from pipeline.models.load import LoadedModel
from pipeline.core.schedules import Schedule
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
    nfe = model.num_train_timesteps if nfe is None else nfe
    ts = teacher_timesteps(model.alphas_cumprod, nfe)
    x_T, _ = initial_noise(seeds, model.sample_shape)
    x0 = run_teacher(model.denoiser, x_T, ts, model.alphas_cumprod, batch_size=batch_size)
    return Teacher(tuple(int(s) for s in seeds), x_T, x0, nfe, tuple(ts))


@dataclass(frozen=True)
class ShardMetrics:
    """One schedule on one seed shard.

    Attributes:
        x0: the schedule's samples [b, ...] (model range; the teacher's own tensor for the teacher's schedule).
        recon: per-seed MSE vs the teacher [b] (float64, [0, 1] scale), or None when not asked for.
        inversion: per-seed inversion round-trip MSE [b], or None without data.
    """

    x0: torch.Tensor
    recon: torch.Tensor | None
    inversion: torch.Tensor | None


def sample_shifted(denoiser: Denoiser, x_T: torch.Tensor, timesteps: Sequence[int], model_shift: Sequence[float],
                   alphas_cumprod: torch.Tensor, solver: str = DEFAULT_SOLVER) -> torch.Tensor:
    """x0 [B, ...] of `solver` over `timesteps` with the network asked at the shifted levels
    (`pipeline.evaluation.gradient.sample_with_shift`). A `BatchInvariant` denoiser's fixed chunks are kept by
    sampling each chunk of its micro-batch size whole, so a sample's bits never depend on its batch."""
    from pipeline.evaluation.gradient import sample_with_shift

    raw = getattr(denoiser, "inner", denoiser)
    size = int(getattr(denoiser, "micro_batch", 0))
    return run_fixed_batches(lambda x: sample_with_shift(raw, x, timesteps, model_shift, alphas_cumprod, solver),
                             [x_T], size)


def shifted_round_trip(
    denoiser: Denoiser,
    x_0: torch.Tensor,
    encode_timesteps: Sequence[int],
    decode_timesteps: Sequence[int],
    alphas_cumprod: torch.Tensor,
    to_unit: Callable[[torch.Tensor], torch.Tensor],
    encode_shift: Sequence[float] | None = None,
    decode_shift: Sequence[float] | None = None,
) -> RoundTrip:
    """`pipeline.metrics.recon.round_trip` with per-step model time shifts: `encode_shift` [n_e]
    (`Schedule.inverse_model_shift`) and `decode_shift` [n_d] (`Schedule.model_shift`); the network is told
    log sigma_i + shift_i while each jump keeps its own level (`pipeline.evaluation.gradient.invert_with_shift`,
    `sample_with_shift`). Without shifts it is `round_trip` itself."""
    enc, dec = tuple(encode_timesteps), tuple(decode_timesteps)
    if encode_shift is None and decode_shift is None:
        return round_trip(denoiser, x_0, enc, dec, alphas_cumprod, to_unit)
    from pipeline.evaluation.gradient import invert_with_shift, sample_with_shift

    if enc and dec and enc[-1] != dec[0]:
        raise StridelabError(f"the encoder ends at timestep {enc[-1]} but decoding starts at {dec[0]}: "
                             "the code must be at the decoder's first noise level")
    for what, shift, steps in (("encode", encode_shift, enc), ("decode", decode_shift, dec)):
        if shift is not None and len(shift) != len(steps):
            raise StridelabError(f"{what}_shift has {len(shift)} entries for {len(steps)} steps")
    # the shifted levels are fractional: the raw network (eps_at_time) is asked, in the wrapper's fixed chunks, so
    # a row's bits never depend on its batch (`pipeline.core.batching.BatchInvariant`)
    raw, size = getattr(denoiser, "inner", denoiser), int(getattr(denoiser, "micro_batch", 0))
    x_T = run_fixed_batches(lambda x: invert_with_shift(raw, x, enc, encode_shift, alphas_cumprod), [x_0], size)
    x_rec = run_fixed_batches(lambda x: sample_with_shift(raw, x, dec, decode_shift, alphas_cumprod), [x_T], size)
    return RoundTrip(x_T, x_rec, per_sample_mse(to_unit(x_rec), to_unit(x_0)))


def evaluate_shard(
    denoiser: Denoiser,
    alphas_cumprod: torch.Tensor,
    to_unit: Callable[[torch.Tensor], torch.Tensor],
    timesteps: Sequence[int],
    x_T: torch.Tensor,
    teacher_x0: torch.Tensor | None,
    teacher_ts: Sequence[int],
    data: torch.Tensor | None = None,
    solver: str = DEFAULT_SOLVER,
    encode_timesteps: Sequence[int] | None = None,
    model_shift: Sequence[float] | None = None,
    encode_shift: Sequence[float] | None = None,
) -> ShardMetrics:
    """Sample `timesteps` with `solver` from the shard's x_T [b, ...] and score it against the teacher.

    The one evaluate-a-shard policy of every evaluator (in-process and Ray actors): the teacher's own
    schedule under DDIM is not sampled again (its samples are the teacher's, its recon exactly 0); recon
    is computed when `teacher_x0` is given; inversion (DDIM's round trip, whatever the solver: inversion
    is DDIM's job) when `data` (x_0 drawn from the data, [b, ...]) is given, encoding along `encode_timesteps`
    where the schedule has an encoder of its own (`Schedule.inverse_timesteps`; None: `timesteps` reversed).
    `model_shift` (`Schedule.model_shift`, n floats): the network is asked at log sigma_i + shift_i while the
    solver integrates at the steps' own levels; the round trip decodes with it too (what the schedule runs),
    and encodes with `encode_shift` (`Schedule.inverse_model_shift`) where it has one.
    """
    if model_shift is not None:
        x0 = sample_shifted(denoiser, x_T, timesteps, model_shift, alphas_cumprod, solver)
    elif teacher_x0 is not None and solver == "ddim" and tuple(timesteps) == tuple(teacher_ts):
        x0 = teacher_x0  # the teacher's own schedule (its FID is the floor of the table): already sampled
    else:
        x0 = solve(solver, denoiser, x_T, timesteps, alphas_cumprod)
    rec = per_sample_mse(to_unit(x0), to_unit(teacher_x0)) if teacher_x0 is not None else None  # = recon_errors
    enc = tuple(timesteps)[::-1] if encode_timesteps is None else tuple(encode_timesteps)
    inv = (shifted_round_trip(denoiser, data, enc, timesteps, alphas_cumprod, to_unit, encode_shift, model_shift).errors
           if data is not None else None)
    return ShardMetrics(x0, rec, inv)


def evaluate_schedule(
    model: LoadedModel,
    schedule: Schedule,
    teacher: Teacher,
    data_x0: torch.Tensor | None = None,
) -> dict[str, float]:
    """Mean recon MSE vs the teacher (and inversion round-trip MSE when data is given), [0, 1] scale, DDIM."""
    m = evaluate_shard(model.denoiser, model.alphas_cumprod, model.to_unit, schedule.timesteps, teacher.x_T, teacher.x0,
                       teacher.timesteps, data_x0, "ddim", schedule.inverse_timesteps, schedule.model_shift,
                       schedule.inverse_model_shift)
    out = {"recon": m.recon.mean().item(), "recon_sem": recon_sem(m.recon)}
    if m.inversion is not None:
        out["inversion"] = m.inversion.mean().item()
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
    ``evaluate(schedules, solver=None) -> list[ScheduleResult]``, results in the order of `schedules`,
    each run by `solver` (default: the one the evaluator was made with) on the evaluator's seeds against
    its teacher (many-step DDIM, whatever the solver: the teacher approximates the exact ODE solution).
    The network is called on chunks of `forward_batch` rows, as in the pool's workers, so its numbers are
    the pool's bit for bit (0 = the whole batch at once).
    """

    def __init__(self, model: LoadedModel, seeds: Sequence[int], teacher_nfe: int | None = None, inversion: bool = False,
                 solver: str = DEFAULT_SOLVER, forward_batch: int = DEFAULT_FORWARD_BATCH):
        if forward_batch > 0:
            model = replace(model, denoiser=BatchInvariant(model.denoiser, forward_batch))
        self.model = model
        self.solver = solver
        self.teacher = make_teacher(model, seeds, teacher_nfe)
        sample_data = getattr(model.denoiser, "sample_data", None)
        self.data = sample_data(seeds) if (inversion and sample_data is not None) else None

    def evaluate(self, schedules: Sequence[Schedule], solver: str | None = None) -> list[ScheduleResult]:
        """Each schedule run by `solver` (default: the evaluator's), in order."""
        import time

        solver = solver or self.solver
        out = []
        for s in schedules:
            t0 = time.perf_counter()
            m = evaluate_shard(self.model.denoiser, self.model.alphas_cumprod, self.model.to_unit, s.timesteps,
                               self.teacher.x_T, self.teacher.x0, self.teacher.timesteps, self.data, solver,
                               s.inverse_timesteps, s.model_shift, s.inverse_model_shift)
            out.append(ScheduleResult(s, m.recon, m.inversion, time.perf_counter() - t0))
        return out
