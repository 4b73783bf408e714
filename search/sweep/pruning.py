"""The pruning screen's statistics and trial isolation when a batch is evaluated.

A batch is first evaluated on the screen seeds (the first `SweepConfig.n_screen` tuning seeds); a trial
whose per-seed errors there are worse than the best trial's on the same seeds (`screen_is_worse`) is
pruned, the others are evaluated on the remaining seeds and `combine`-d. Per-seed results do not depend
on batching, so screen + rest equals one evaluation on all tuning seeds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.core.schedules import Schedule
from pipeline.errors import PlacementTimeout
from pipeline.evaluation.inprocess import ScheduleResult


def screen_is_worse(trial_errs: np.ndarray, best_errs: np.ndarray, p_threshold: float) -> tuple[bool, float]:
    """One-sided Wilcoxon signed-rank test that `trial_errs` > `best_errs` (paired by seed): (prune?, p).

    The test Optuna's WilcoxonPruner uses; both arrays have shape ``(n_screen,)``.
    """
    from scipy.stats import wilcoxon

    d = np.asarray(trial_errs, dtype=np.float64) - np.asarray(best_errs, dtype=np.float64)
    if d.mean() <= 0 or not np.any(d != 0):
        return False, 1.0
    p = float(wilcoxon(d, alternative="greater", zero_method="zsplit").pvalue)
    return p < p_threshold, p


def combine(a: ScheduleResult, b: ScheduleResult) -> ScheduleResult:
    """Screen-stage + rest-stage results of one schedule as one result on all tuning seeds."""
    inv = torch.cat([a.inversion, b.inversion]) if a.inversion is not None and b.inversion is not None else None
    return ScheduleResult(a.schedule, torch.cat([a.recon, b.recon]), inv, a.seconds + b.seconds, None)


def safe_evaluate(ev: Any, schedules: list[Schedule], solver: str | None = None) -> list[ScheduleResult | Exception]:
    """Evaluate a batch (run by `solver`, default the evaluator's); if the batch raises, evaluate one by one
    so one bad schedule fails only itself."""
    if not schedules:
        return []
    try:
        return list(ev.evaluate(schedules) if solver is None else ev.evaluate(schedules, solver=solver))
    except (KeyboardInterrupt, SystemExit, PlacementTimeout):  # the cluster, not a trial: stop the sweep
        raise
    except Exception as e:  # trial isolation in the driver: a failing trial must not end the sweep
        if len(schedules) == 1:
            return [e]
    return [safe_evaluate(ev, [s], solver)[0] for s in schedules]
