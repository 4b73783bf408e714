"""Honest numbers: the schedules re-evaluated on held-out seeds and the comparison table built from them.

Columns of a row (one schedule): ``schedule, solver, nfe`` (model evaluations), ``steps, holdout_<metric>`` (``recon`` and, when evaluated, ``fid``),
``tuning_recon`` (its mean on the tuning seeds), ``timesteps`` (and ``encode_timesteps`` where the round trip
has an encoder of its own, ``model_shift`` where the network is asked at shifted levels), and the ratios
    ``x_best_baseline``          holdout_recon / min over the baseline rows (`SCHEDULES` and the solver's
                                 ``default``), all run by the sweep's solver
    ``x_best_default_pair``      holdout_recon / min over those and the reference rows ``<solver> default``
                                 (every other solver with its own default spacing at the same budget)
    ``x_best_baseline_lo, _hi``  its 95% interval: a paired bootstrap over the held-out seeds
                                 (`pipeline.metrics.recon.paired_ratio_interval`), the best baseline fixed
    ``x_best_default_pair_lo, _hi``  likewise
    ``inv_x_best_baseline``, ``_lo``, ``_hi``  with inversion (``holdout_inversion``, the DDIM round trip on the
                                 held-out images): holdout_inversion / min over the baseline rows, and its
                                 paired 95% interval
    ``fid_x_best_baseline``      holdout_fid / min over the `SCHEDULES` rows
    ``fid_gap_x_best_baseline``  (holdout_fid - teacher's) / (best baseline's - teacher's): the share of the
                                 gap to the teacher's FID floor left open (only with a teacher row)
Rows: the learned schedule first, then the rest by held-out recon, the teacher last. The reference rows
mean a learned schedule is never shown without the strongest thing a user could pick instead, and
`verdict` says in one line whether the learned row's interval is below 1, straddles it or is above it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from pipeline.core.schedules import SCHEDULES, Schedule, uniform
from pipeline.evaluation.inprocess import ScheduleResult
from pipeline.metrics.recon import paired_ratio_interval, recon_sem
from search import export
from pipeline.solvers.registry import SOLVERS
from search.sweep.config import SweepConfig
from search.sweep.pruning import safe_evaluate

TEACHER_PREFIX = "teacher ("
UNSHIFTED = "learned (unshifted)"
"""Held-out row of the trial a selected time-shift trial started from."""


def learned_schedule(bt: optuna.trial.FrozenTrial, space: str, num_train_timesteps: int,
                     solver: str = "ddim") -> tuple[str, Schedule]:
    """(row name, schedule) of the best trial; a warm start that stayed best is named ``learned (= name)``.
    Its meta records the solver it was tuned for (``SolverSpec.record()``), which exports carry."""
    best = export.schedule_of_trial(bt, num_train_timesteps)
    name = "learned" if bt.user_attrs.get("kind") != "baseline" else f"learned (= {best.name})"
    kind = bt.user_attrs.get("kind")
    learned = Schedule(best.timesteps, best.num_train_timesteps, "learned",
                       {"space": "steps" if kind in ("polish", "shift") else space,
                        **{k: float(v) for k, v in bt.params.items()}},
                       {"solver": SOLVERS[solver].record(), **best.meta})
    return name, learned


def unshifted_schedule(study: optuna.Study, bt: optuna.trial.FrozenTrial, num_train_timesteps: int) -> Schedule | None:
    """The trial a selected time-shift trial started from (its steps before the shift and the move), or None when
    `bt` is not a time-shift trial: the held-out table shows it as `UNSHIFTED`, so the shift's own gain is there."""
    if bt.user_attrs.get("kind") != "shift":
        return None
    return export.schedule_of_trial(study.trials[int(bt.user_attrs["shift_from"])], num_train_timesteps)


def warm_schedules(study: optuna.Study, num_train_timesteps: int) -> dict[str, Schedule]:
    """Every completed warm start of the study by name (the gradient placement's, ``gradient``, included: its
    held-out row is what the placement alone achieves, before the search)."""
    return {t.user_attrs["schedule"]: export.schedule_of_trial(t, num_train_timesteps)
            for t in study.get_trials(deepcopy=False)
            if t.user_attrs.get("kind") in ("baseline", "gradient") and t.state == TrialState.COMPLETE}


def teacher_schedule(cfg: SweepConfig, alphas_cumprod: Any, num_train_timesteps: int) -> tuple[str, Schedule]:
    """The teacher's own row: its FID on the same seeds is the floor no NFE-n schedule can beat (with a few
    hundred samples FID's bias dominates it), so the table can say how much of the gap is closed."""
    n_teacher = cfg.teacher_nfe or num_train_timesteps
    return f"{TEACHER_PREFIX}{n_teacher}-step DDIM)", Schedule(
        uniform(n_teacher, alphas_cumprod).timesteps, num_train_timesteps, "teacher")


def tuning_recon(study: optuna.Study, bt: optuna.trial.FrozenTrial, learned_name: str) -> dict[str, float | None]:
    """Mean recon on the tuning seeds of every warm start and of the learned schedule, by row name."""
    tuning = {t.user_attrs["schedule"]: t.user_attrs.get("recon") for t in study.get_trials(deepcopy=False)
              if t.user_attrs.get("kind") == "baseline"}
    tuning[learned_name] = bt.user_attrs.get("recon")
    return tuning


PAIR_SYMMETRIC = "learned (symmetric)"
"""With ``inversion_pair joint`` the learned row is the searched encoder/decoder pair; this row is the selected
schedule's own symmetric round trip, the comparison the pair search must win."""


REFERENCE_SUFFIX = " default"
"""Reference rows are named ``<solver> default``: another solver with its own diffusers default spacing."""


def reference_schedules(cfg: SweepConfig, model: Any) -> dict[str, tuple[str, Schedule]]:
    """``{"<solver> default": (solver, schedule)}`` for every solver but the sweep's, each at the most steps
    that fit the sweep's budget of `nfe` model evaluations (Heun: (nfe + 1) // 2)."""
    from pipeline.interop.defaults import default_spacing

    out = {}
    for name, spec in SOLVERS.items():
        if name != cfg.solver:
            out[name + REFERENCE_SUFFIX] = (name, default_spacing(name, spec.steps_for_budget(cfg.nfe), model.alphas_cumprod))
    return out


def evaluate_by_solver(ev: Any, entries: Sequence[tuple[str, Schedule, str]], own_solver: str,
                       on_done: Callable[[int], None] | None = None) -> list[ScheduleResult | Exception]:
    """Results of ``(name, schedule, solver)`` entries in order: one evaluation call per solver (the
    evaluator's own solver without naming it, so any ``evaluate(schedules)`` evaluator serves it).
    ``on_done(k)`` after each call, with the k schedules it evaluated (a progress bar)."""
    results: list[ScheduleResult | Exception | None] = [None] * len(entries)
    for solver in dict.fromkeys(e[2] for e in entries):
        idx = [i for i, e in enumerate(entries) if e[2] == solver]
        got = safe_evaluate(ev, [entries[i][1] for i in idx], None if solver == own_solver else solver)
        for i, r in zip(idx, got):
            results[i] = r
        if on_done is not None:
            on_done(len(idx))
    return results  # type: ignore[return-value]


def objective_metrics(r: ScheduleResult) -> dict[str, float]:
    """Mean recon and every extra metric (fid) of one result, as floats."""
    out = {"recon": float(r.recon.double().mean())}
    if r.inversion is not None:
        out["inversion"] = float(r.inversion.double().mean())
    for k, v in (r.extra or {}).items():
        out[k] = float(v)
    return out


def holdout_rows(named: Mapping[str, Schedule], results: Sequence[ScheduleResult | Exception],
                 tuning: Mapping[str, float | None], solvers: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """The comparison table (module docstring) from the held-out `results` of `named` (the learned one first),
    each row run by ``solvers[name]`` (default ddim)."""
    rows = []
    solvers = solvers or {}
    per_seed: dict[str, np.ndarray] = {}  # held-out recon per seed by row: the bootstrap pairs them
    per_seed_inv: dict[str, np.ndarray] = {}  # likewise the round-trip errors, when evaluated
    for (name, s), r in zip(named.items(), results):
        solver = solvers.get(name, "ddim")
        row: dict[str, Any] = {"schedule": name, "solver": solver, "nfe": SOLVERS[solver].evaluations(s.nfe),
                               "steps": s.nfe}
        if isinstance(r, Exception):
            row["error"] = str(r)
        else:
            row.update({f"holdout_{k}": v for k, v in objective_metrics(r).items()})
            row["holdout_recon_sem"] = recon_sem(r.recon)
            per_seed[name] = r.recon.double().cpu().numpy()
            if r.inversion is not None:
                per_seed_inv[name] = r.inversion.double().cpu().numpy()
        row["tuning_recon"] = tuning.get(name)
        row["timesteps"] = " ".join(map(str, s.timesteps))
        if s.inverse_timesteps is not None:  # a round trip with an encoder of its own (``inversion_pair`` joint)
            row["encode_timesteps"] = " ".join(map(str, s.inverse_timesteps))
        if s.model_shift is not None:  # a time-shift trial (``time_shift``): where the network was asked instead
            row["model_shift"] = " ".join(f"{v:+.3f}" for v in s.model_shift)
        if s.inverse_model_shift is not None:  # ... and, with the inversion objective, the encoder's
            row["encode_shift"] = " ".join(f"{v:+.3f}" for v in s.inverse_model_shift)
        rows.append(row)
    best_fid = _add_ratios(rows, per_seed)
    _add_recon_ratio(rows, per_seed_inv, "inv_x_best_baseline", lambda r: is_baseline(r["schedule"]), "inversion")
    teacher_rows = [r for r in rows if r["schedule"].startswith(TEACHER_PREFIX)]
    if teacher_rows and "holdout_fid" in teacher_rows[0]:
        _add_fid_gap(rows, teacher_rows[0]["holdout_fid"], best_fid)
    _add_best_any(rows, per_seed)
    others = [r for r in rows[1:] if r not in teacher_rows]
    return rows[:1] + sorted(others, key=lambda r: r.get("holdout_recon", math.inf)) + teacher_rows


def _add_ratios(rows: list[dict[str, Any]], per_seed: Mapping[str, np.ndarray]) -> float | None:
    """Add ``x_best_baseline`` (and its interval) and ``fid_x_best_baseline`` in place; returns the best
    baseline's FID."""
    _add_recon_ratio(rows, per_seed, "x_best_baseline", lambda r: is_baseline(r["schedule"]))
    base_fids = [r["holdout_fid"] for r in rows if is_baseline(r["schedule"]) and "holdout_fid" in r]
    best_fid = min(base_fids, default=None)
    for r in rows:
        if best_fid and "holdout_fid" in r:
            r["fid_x_best_baseline"] = r["holdout_fid"] / best_fid
    return best_fid


def _add_recon_ratio(rows: list[dict[str, Any]], per_seed: Mapping[str, np.ndarray], col: str,
                     in_pool: Any, metric: str = "recon") -> None:
    """Add ``col`` = holdout_<metric> / the least holdout_<metric> of the rows `in_pool` selects, and ``col_lo``,
    ``col_hi``: its paired 95% bootstrap interval over the held-out seeds (that best row fixed); `per_seed`:
    the rows' per-seed <metric>."""
    key = f"holdout_{metric}"
    pool = [r for r in rows if key in r and in_pool(r)]
    if not pool:
        return
    best = min(pool, key=lambda r: r[key])
    if not best[key] > 0:
        return
    for r in rows:
        if key in r:
            r[col] = r[key] / best[key]
            if r["schedule"] in per_seed and best["schedule"] in per_seed and np.all(per_seed[best["schedule"]] > 0):
                r[f"{col}_lo"], r[f"{col}_hi"] = paired_ratio_interval(per_seed[r["schedule"]],
                                                                       per_seed[best["schedule"]])


def is_baseline(name: str) -> bool:
    """A row of the sweep's own solver under a named spacing (its diffusers default included)."""
    return name in SCHEDULES or name == "default"


def _add_best_any(rows: list[dict[str, Any]], per_seed: Mapping[str, np.ndarray]) -> None:
    """Add ``x_best_default_pair`` (and its interval) in place: holdout_recon / min over the baselines and every
    other solver's default spacing (the strongest zero-search pick a user has at this budget)."""
    _add_recon_ratio(rows, per_seed, "x_best_default_pair",
                     lambda r: is_baseline(r["schedule"]) or r["schedule"].endswith(REFERENCE_SUFFIX))


def _add_fid_gap(rows: list[dict[str, Any]], floor: float, best_fid: float | None) -> None:
    """Add ``fid_gap_x_best_baseline`` in place (only where the best baseline is above the floor)."""
    for r in rows:
        if best_fid is not None and best_fid > floor and "holdout_fid" in r:
            r["fid_gap_x_best_baseline"] = (r["holdout_fid"] - floor) / (best_fid - floor)


@dataclass(frozen=True)
class Verdict:
    """Whether the learned schedule beats the best baseline on the held-out seeds, from its 95% interval.

    Attributes:
        kind: ``better`` (interval below 1), ``unclear`` (it contains 1), ``worse`` (above 1), ``baseline``
            (the learned schedule is the best baseline itself: validation chose it) or ``unknown`` (no ratio).
        text: one line saying so and what to do; parameters in backticks (`pipeline.errors`).
    """

    kind: str
    text: str


RATIO_COLUMNS = {"recon": "x_best_baseline", "inversion": "inv_x_best_baseline"}
"""The ratio-to-the-best-baseline column of each per-seed metric a verdict can be read from."""


def verdict(rows: Sequence[Mapping[str, Any]], metric: str = "recon") -> Verdict:
    """The verdict of the learned row (the first) against the best baseline on `metric` (``recon`` or
    ``inversion``: the objective's per-seed metric; the table's rows, module docstring)."""
    learned, col, key = rows[0], RATIO_COLUMNS[metric], f"holdout_{metric}"
    if f"{col}_lo" not in learned:
        return Verdict("unknown", "no held-out ratio to the best baseline: cannot say whether the learned schedule wins")
    base = min((r for r in rows if is_baseline(r["schedule"]) and key in r), key=lambda r: r[key])
    lo, hi = learned[f"{col}_lo"], learned[f"{col}_hi"]
    what = "" if metric == "recon" else f" {metric} round-trip error"
    ratio = (f"{learned[col]:.2f}x the best baseline {base['schedule']}{what} "
             f"(95% interval {lo:.2f} to {hi:.2f})")
    more = "run with more tuning and validation seeds (`num_seeds`, `validation_seeds`)"
    # the same steps with a model time shift (or an encoder of its own) is another schedule, not the baseline
    if all(learned.get(k) == base.get(k) for k in ("timesteps", "encode_timesteps", "model_shift", "encode_shift")):
        return Verdict("baseline", f"the learned schedule is the best baseline {base['schedule']}: no trial beat it on "
                                   f"the validation seeds, so that is what was exported; to find a better one, {more}")
    if hi < 1:
        return Verdict("better", f"better: the learned schedule is {ratio} on the held-out seeds")
    if lo > 1:
        return Verdict("worse", f"worse: the learned schedule is {ratio} on the held-out seeds; it was exported "
                                f"anyway: use {base['schedule']} instead, or {more}")
    return Verdict("unclear", f"not distinguishable: the learned schedule is {ratio} on the held-out seeds; "
                              f"{more}, and more held-out seeds (`holdout_seeds`) for a narrower interval")
