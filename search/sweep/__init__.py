"""The step-placement sweep: Optuna ask/tell in batches over an evaluator, tracked in MLflow.

Flow of `run_sweep` (`search.sweep.run`), one module per step:

1. Open (or resume) the study; mark RUNNING trials left by a killed driver FAIL (`search.study`).
2. Warm starts (`search.sweep.loop`): every baseline of `pipeline.core.schedules.SCHEDULES` and the DP
   placement (`search.placement.dp`) is evaluated on all tuning seeds and added as an ordinary trial.
3. Search (`search.sweep.loop`): ``study.ask()`` `parallel` trials, evaluate them in one call, ``study.tell``
   each; a failing schedule is told FAIL and the sweep goes on. The last `polish` trials refine the best
   schedule by compass search on the integer timestep grid (`search.placement.polish`).
4. Pruning (objective ``recon`` only, `search.sweep.pruning`): a batch is first evaluated on the first
   `SweepConfig.n_screen` tuning seeds; a trial worse than the best there by a one-sided Wilcoxon
   signed-rank test (p < `prune_p`) is told PRUNED, survivors are evaluated on the remaining seeds.
5. Honest numbers (`search.sweep.holdout`): the best trial's schedule and every warm start are
   re-evaluated on held-out seeds (a disjoint range starting at ``seed + HOLDOUT_OFFSET``), as a table.
6. Outputs (`search.sweep.outputs`): best schedule JSON, Parquet table of every trial, comparison CSV,
   plots and sample grids in ``out_dir`` and on the MLflow parent run; the table is printed.
"""

from search.sweep.config import (ALL_BASELINES, AUTO_SCREEN_MIN, DEFAULT_BASELINES, HOLDOUT_OFFSET, SweepConfig,
                                 SweepResult)
from search.sweep.holdout import holdout_rows, objective_metrics
from search.sweep.loop import Sweep
from search.sweep.pruning import combine, safe_evaluate, screen_is_worse
from search.sweep.run import default_study_name, run_sweep, state_counts

__all__ = [
    "ALL_BASELINES", "AUTO_SCREEN_MIN", "DEFAULT_BASELINES", "HOLDOUT_OFFSET", "Sweep", "SweepConfig", "SweepResult",
    "combine", "default_study_name", "holdout_rows", "objective_metrics", "run_sweep", "safe_evaluate",
    "screen_is_worse", "state_counts",
]
