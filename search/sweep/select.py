"""Which trial the sweep exports: the best of a few candidates on validation seeds the search never saw.

The study's best trial is the best on the tuning seeds, the seeds the sampler and the polish phase fitted. With
few tuning seeds and heavy-tailed per-seed errors (a few seeds whose trajectory ends on another mode than the
teacher's carry most of the mean), that trial can be fitted to those seeds and lose to a plain baseline on new
ones. So (single objective, `SweepConfig.validation_seeds` > 0) the `VALIDATION_TOP` best distinct schedules of
the study and every warm start are evaluated on the validation seeds (`SweepConfig.validation_seed_list`),
and the study's best is exported unless a candidate beats it there beyond the seeds' noise (`guarded_choice`);
when a warm start wins, the learned schedule is that baseline (``learned (= uniform)``). The held-out seeds play no part. The choice is recorded on the study (user attrs
``selected_trial``, ``validation``), so `search.export.best_trial` (``stridelab export --study-name``) hands out
the same trial, and on resume it is made again from the finished study.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from pipeline.core.schedules import INVERSE_MODEL_SHIFT_KEY, MODEL_SHIFT_KEY
from pipeline.metrics.recon import paired_ratio_interval
from search import export
from search.evaluators import Objective, TrialFailed
from search.sweep.config import SweepConfig
from search.sweep.pruning import safe_evaluate

VALIDATION_TOP = 5
"""Best trials re-evaluated on the validation seeds (plus every warm start not among them)."""

ALWAYS_CANDIDATES = ("baseline", "gradient", "shift")
"""Trial kinds re-scored on validation whatever their tuning rank: the warm starts and the time-shift trial."""


@dataclass(frozen=True)
class Selection:
    """The exported trial and the validation table it was chosen from.

    Attributes:
        trial: the exported trial.
        tuning_best: the study's best trial on the tuning seeds (the export without validation).
        validation: ``{trial number: objective on the validation seeds}`` of every candidate that evaluated
            (empty without validation).
    """

    trial: optuna.trial.FrozenTrial
    tuning_best: optuna.trial.FrozenTrial
    validation: dict[int, float]


def candidates(study: optuna.Study, top: int = VALIDATION_TOP) -> list[optuna.trial.FrozenTrial]:
    """The `top` best COMPLETE trials with distinct timesteps (and model time shift), best first, then every other
    COMPLETE warm start and time-shift trial, best first: a warm start is what a user could pick instead, and with
    heavy-tailed per-seed errors the best warm start on the tuning seeds need not be the best on new ones."""
    done = sorted((t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if "timesteps" in t.user_attrs),
                  key=lambda t: t.value)
    out: list[optuna.trial.FrozenTrial] = []
    seen: set[tuple[int, ...]] = set()
    for t in done:
        ts = (tuple(t.user_attrs["timesteps"]), tuple(t.user_attrs.get(MODEL_SHIFT_KEY) or ()),
              tuple(t.user_attrs.get(INVERSE_MODEL_SHIFT_KEY) or ()))
        if ts not in seen and (len(out) < top or t.user_attrs.get("kind") in ALWAYS_CANDIDATES):
            out.append(t)
            seen.add(ts)
    return out


def select_trial(cfg: SweepConfig, study: optuna.Study, evaluator: Any | None, num_train_timesteps: int,
                 log: Callable[[str], None] = print) -> Selection:
    """The trial to export (module docstring).

    Args:
        evaluator: an evaluator on ``cfg.validation_seed_list`` when `cfg.validating`, else None (the study's
            best trial is exported).
    """
    best = export.best_trial(study, selected=False)
    if evaluator is None or not cfg.validating:
        _record(study, best, {})
        return Selection(best, best, {})
    objective = Objective(cfg.objective, cfg.fid_weight)
    cands = candidates(study)
    scores: dict[int, float] = {}
    per_seed: dict[int, Any] = {}
    results = safe_evaluate(evaluator, [export.schedule_of_trial(t, num_train_timesteps) for t in cands])
    for t, res in zip(cands, results):
        try:
            if isinstance(res, Exception):
                raise TrialFailed(str(res))
            value = objective.values(objective.metrics(res))[0]
        except TrialFailed:
            continue  # a candidate that cannot be scored is not a candidate
        if math.isfinite(value):
            scores[t.number] = value
            if objective.name in ("recon", "inversion"):  # one per-seed error: the paired test applies
                errs = res.recon if objective.name == "recon" else res.inversion
                per_seed[t.number] = errs.double().cpu().numpy()
    chosen = guarded_choice(best, cands, scores, per_seed)
    log(f"validation on {cfg.validation_seeds} seeds: "
        + ", ".join(f"trial {t.number}{_label(t)} {scores[t.number]:.4g}" for t in cands if t.number in scores)
        + f"; exporting trial {chosen.number}{_label(chosen)}"
        + ("" if chosen.number == best.number else f", not trial {best.number}, the best on the tuning seeds"))
    _record(study, chosen, scores)
    return Selection(chosen, best, scores)


def guarded_choice(best: optuna.trial.FrozenTrial, cands: list[optuna.trial.FrozenTrial], scores: dict[int, float],
                   per_seed: dict[int, Any], level: float = 0.95) -> optuna.trial.FrozenTrial:
    """The tuning-best trial, unless a candidate beats it on the validation seeds beyond their noise.

    With per-seed errors (recon), a candidate replaces `best` only when the paired bootstrap interval of
    mean(best) / mean(candidate) over the validation seeds lies above 1 (`paired_ratio_interval`); of several,
    the least validation objective wins. Picking the plain least validation mean instead hands out whichever
    of near-equal candidates the (fewer, noisier) validation seeds favour: on the default sweep it exported
    quadratic, 1.55x uniform's held-out recon, over a learned schedule better than uniform on the tuning seeds.
    Without per-seed errors (FID) or when `best` could not be scored, the least validation objective wins.
    Ties go to the better tuning rank (`cands` is in that order).
    """
    if not scores:
        return best
    if best.number not in scores or best.number not in per_seed:
        return min(cands, key=lambda t: scores.get(t.number, math.inf))
    beaters = [t for t in cands if t.number != best.number and t.number in per_seed
               and paired_ratio_interval(per_seed[best.number], per_seed[t.number], level)[0] > 1.0]
    return min(beaters, key=lambda t: scores[t.number]) if beaters else best


def _label(t: optuna.trial.FrozenTrial) -> str:
    return f" ({t.user_attrs.get('schedule')})" if t.user_attrs.get("kind") == "baseline" else ""


def _record(study: optuna.Study, trial: optuna.trial.FrozenTrial, scores: dict[int, float]) -> None:
    study.set_user_attr("selected_trial", trial.number)
    study.set_user_attr("validation", {str(k): v for k, v in scores.items()})
