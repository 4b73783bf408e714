"""The DDIM round trip's per-step model time shifts, encoder and decoder, learned by gradient on tuning images
(``stridelab sweep --objective inversion --time-shift``).

DDIM inversion jumps from level i to level i + 1 with eps evaluated at the point it has, labelled with the level
it goes to: a stand-in for eps at the point it will reach, which the decoder uses on the way back. At few steps
that mismatch is most of the round trip's error. Telling the network another level than the one each jump lands
at (log sigma_i + shift_i, `pipeline.core.noise.model_levels`) corrects part of it at no extra model evaluation;
the decoder gets shifts of its own. The steps stay where they are (integers, what diffusers' ``timesteps=``
takes); the 2n shifts start at 0 and are learned by `search.placement.gradient.adam_descent` through the round
trip itself (`pipeline.evaluation.gradient.round_trip_loss_and_grad`), on one split of the images, the lowest
all-image loss kept.

Measured (``benchmarks/bench_inversion_shift.py``, NFE 10, held-out images): encoder and decoder shifts 0.47x the
best baseline's round trip on bundled:digits, 0.24x on bundled:digits-v; the encoder's alone 0.78x / 0.79x.

Example:
    >>> from pipeline.core.schedules import Schedule
    >>> from pipeline.models.load import load_model
    >>> m = load_model("gmm:ring8")
    >>> s = Schedule((999, 666, 333), 1000)
    >>> fn = local_round_trip_grad_fn(m, m.denoiser.sample_data(list(range(8))), s)
    >>> r = learn_inversion_shift(fn, s, GradientConfig(iters=3), num_seeds=8)
    >>> len(r.schedule.inverse_model_shift or ()) in (0, 3)
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from pipeline.core.schedules import INVERSE_MODEL_SHIFT_KEY, MODEL_SHIFT_KEY, Schedule
from search.placement.gradient import GradFn, GradientConfig, adam_descent, fan_out


def local_round_trip_grad_fn(model, data: torch.Tensor, schedule: Schedule, dtype: torch.dtype = torch.float32) -> GradFn:
    """A `GradFn` over the images `data` [N, ...] (the model's data range) in this process: the round trip encodes
    along ``schedule.encode_timesteps`` and decodes along ``schedule.timesteps``."""
    from pipeline.evaluation.gradient import round_trip_loss_and_grad

    x = data.to(dtype)
    lo, hi = model.data_range
    enc, dec = list(schedule.encode_timesteps), list(schedule.timesteps)

    def fn(shifts: torch.Tensor, delta: None = None, rows: torch.Tensor | None = None):
        return round_trip_loss_and_grad(model.denoiser, x if rows is None else x[rows], enc, dec, shifts,
                                        model.alphas_cumprod, scale=1.0 / (hi - lo))

    return fn


def pool_round_trip_grad_fn(pools: Sequence, schedule: Schedule, dtype: str = "float32") -> GradFn:
    """A `GradFn` over the images of `pools` together (each a `SamplerPool` built with ``inversion=True``; each actor
    differentiates the round trip on its shard's images, `SamplerPool.submit_round_trip_gradient`)."""
    enc, dec = list(schedule.encode_timesteps), list(schedule.timesteps)
    return fan_out(pools, lambda p, shifts, delta, rows: p.submit_round_trip_gradient(shifts, enc, dec, dtype, rows))


@dataclass(frozen=True)
class InversionShiftResult:
    """What `learn_inversion_shift` learned.

    Attributes:
        schedule: the input schedule with both shifts in ``meta`` (`INVERSE_MODEL_SHIFT_KEY`, `MODEL_SHIFT_KEY`).
        losses: the mean round-trip error before each Adam step and after the last ([iters + 1]).
        best_iteration: the kept evaluation (the lowest all-image loss; 0 = no shift).
        full_iterations: the evaluations over all the images.
        shifts: the kept [n_e + n_d] shifts, encoder first.
    """

    schedule: Schedule
    losses: tuple[float, ...]
    best_iteration: int
    full_iterations: tuple[int, ...]
    shifts: torch.Tensor = field(repr=False)


SIDES: tuple[str, ...] = ("both", "encoder")
"""What the round trip's time shift learns: the encoder's and the decoder's shifts, or the encoder's only (the
decoder stays plain DDIM, so any scheduler or sigma list decodes the codes)."""


def learn_inversion_shift(grad_fn: GradFn, schedule: Schedule, config: GradientConfig = GradientConfig(), *,
                          num_seeds: int, callback: Callable[[int, float, bool], None] | None = None,
                          sides: str = "both") -> InversionShiftResult:
    """Learn the round trip's encoder and decoder shifts for `schedule`'s steps (which stay fixed).

    Args:
        grad_fn: sums over `num_seeds` images (`local_round_trip_grad_fn`, `pool_round_trip_grad_fn`).
        schedule: the steps; its encoder is `Schedule.encode_timesteps`.
        config: iterations, learning rate and its decay, mini-batches (``slack_radius``, ``loss`` and
            ``time_shift`` do not apply: the loss is the round trip's MSE on the [0, 1] scale).
        callback: ``callback(iteration, mean_loss, all_images)`` after each evaluation.
        sides: `SIDES`: "encoder" learns the encoder's shifts only (the decoder's gradient is held at zero, so Adam
            never moves them; the schedule then carries no decoder shift).
    """
    from pipeline.errors import StridelabError

    if sides not in SIDES:
        raise StridelabError(f"unknown shift sides {sides!r}; choose one of {', '.join(SIDES)}", param="shift_sides")
    n_e, n_d = len(schedule.encode_timesteps), len(schedule.timesteps)
    fn = grad_fn if sides == "both" else _encoder_only(grad_fn, n_e)
    d = adam_descent(fn, torch.zeros(n_e + n_d, dtype=torch.float64), config, num_seeds=num_seeds,
                     on_eval=None if callback is None else (lambda it, loss, th, full: callback(it, loss, full)))
    enc, dec = [float(v) for v in d.best_theta[:n_e]], [float(v) for v in d.best_theta[n_e:]]
    meta = {**{k: v for k, v in schedule.meta.items() if k != MODEL_SHIFT_KEY}, INVERSE_MODEL_SHIFT_KEY: enc,
            **({MODEL_SHIFT_KEY: dec} if sides == "both" else {}),
            "shift_tuning_inversion": d.losses[d.best_iteration], "shift_best_iteration": d.best_iteration}
    learned = Schedule(schedule.timesteps, schedule.num_train_timesteps, schedule.name, schedule.params, meta,
                       schedule.inverse_timesteps)
    return InversionShiftResult(learned, d.losses, d.best_iteration, d.full_iterations, d.best_theta)


def _encoder_only(grad_fn: GradFn, n_e: int) -> GradFn:
    """`grad_fn` with the decoder's entries of the gradient zeroed (the shifts after the first `n_e`)."""
    def fn(shifts, delta=None, rows=None):
        total, g, g_delta = grad_fn(shifts, delta) if rows is None else grad_fn(shifts, delta, rows=rows)
        g = g.clone()
        g[n_e:] = 0
        return total, g, g_delta

    fn.strata = getattr(grad_fn, "strata", None)
    fn.groups = getattr(grad_fn, "groups", None)
    return fn
