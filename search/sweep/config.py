"""What a sweep does (`SweepConfig`) and what it hands back (`SweepResult`).

Seed ranges (``s`` = `SweepConfig.seed`):
    tuning seeds    ``s .. s + num_seeds - 1``; the pruning screen is the first `SweepConfig.n_screen` of them
    validation      ``s + VALIDATION_OFFSET .. s + VALIDATION_OFFSET + validation_seeds - 1``: never seen by the
                    search; they choose the exported schedule among the top trials (`search.sweep.select`)
    held-out seeds  ``s + HOLDOUT_OFFSET .. s + HOLDOUT_OFFSET + holdout_seeds - 1``: only the final table

Trial budget (`SweepConfig.trials`, warm starts included): the warm starts first, then the sampler's
(`search_trials`), then polish (`polish_trials`), which takes at most `POLISH_SHARE` of what the warm starts
leave, so a small budget still searches globally before it refines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from pipeline.core.schedules import SCHEDULES, Schedule
from pipeline.errors import StridelabError
from pipeline.models.load import DTYPES
from pipeline.solvers.registry import DEFAULT_SOLVER, SOLVERS, get_solver
from search.defaults import DEFAULT_MODEL, DEFAULTS
from search.evaluators import OBJECTIVES, Objective
from search.space import SPACES
from search.study import SAMPLERS

HOLDOUT_OFFSET = 1_000_000
"""Held-out seeds start here (plus --seed): disjoint from any tuning range shorter than this."""
VALIDATION_OFFSET = 2 * HOLDOUT_OFFSET
"""Validation seeds start here (plus --seed): disjoint from the tuning and the held-out ranges."""
POLISH_SHARE = Fraction(2, 3)
"""Polish takes at most this share of the trials after the warm starts. The default sweep (150 trials, 10 warm
starts, polish 80) is under the cap (93) and keeps its 60 sampler trials; ``trials=30`` gets 13 polish, 7 sampler."""

METHODS = ("optuna", "gradient")
"""How the sweep places steps: Optuna trials only, or also one gradient (LD3-style) placement as a warm start."""
GRAD_INITS = ("uniform", "dp")
"""Where the gradient placement starts: uniform steps, or the sweep's DP placement (a combination: DP, then gradient)."""
INVERSION_PAIRS = ("symmetric", "joint")
"""The round trip of an inversion sweep: one schedule both ways, or the exported schedule's encoder searched with
its decoder after the search (`search.placement.pair`), kept only where it beats the symmetric one on validation."""

DEFAULT_BASELINES: tuple[str, ...] = (*SCHEDULES, "dp")
"""The DDIM sweep's warm starts (DDIM's own default spacing is `uniform`, already among them)."""
ALL_BASELINES: tuple[str, ...] = ("default", *DEFAULT_BASELINES, "dp_free")
"""Warm starts a sweep accepts: ``default`` (the solver's diffusers ``set_timesteps(n)`` spacing,
`pipeline.interop.defaults`), the schedules, ``dp`` and ``dp_free`` (the DP choosing its start)."""


def baselines_for(solver: str) -> tuple[str, ...]:
    """The default warm starts of a sweep for `solver`: its own default spacing first (except DDIM's, which is
    `uniform`), then every schedule and the DP placement."""
    return DEFAULT_BASELINES if solver == DEFAULT_SOLVER else ("default", *DEFAULT_BASELINES)

AUTO_SCREEN_MIN = 8
"""The automatic pruning screen (``screen_seeds = 0``) uses at least this many tuning seeds."""


@dataclass(frozen=True)
class SweepConfig:
    """What a sweep does (everything that changes its numbers); logged as the parent run's params.

    `nfe` is the budget in model evaluations; `solver` runs every schedule (`steps` of them per schedule).
    `baselines` None: `baselines_for(solver)`.
    """

    model: str = DEFAULT_MODEL
    nfe: int = DEFAULTS["nfe"]
    solver: str = DEFAULT_SOLVER
    trials: int = DEFAULTS["trials"]
    parallel: int = DEFAULTS["parallel"]
    sampler: str = DEFAULTS["sampler"]
    space: str = DEFAULTS["space"]
    objective: str = DEFAULTS["objective"]
    fid_weight: float = DEFAULTS["fid_weight"]
    num_seeds: int = DEFAULTS["num_seeds"]
    holdout_seeds: int = DEFAULTS["holdout_seeds"]
    validation_seeds: int = DEFAULTS["validation_seeds"]
    seed: int = DEFAULTS["seed"]
    baselines: tuple[str, ...] | None = None
    prune: bool = True
    screen_seeds: int = DEFAULTS["screen_seeds"]
    prune_p: float = 0.05
    teacher_nfe: int | None = DEFAULTS["teacher_nfe"]
    polish: int = DEFAULTS["polish"]
    dp_seeds: int = 64
    dp_grid: int = 160
    grid_seeds: int = 64
    holdout_fid: bool = True
    dtype: str = "float32"  # the network's (`pipeline.models.load.DTYPES`); changes the numbers a little
    method: str = "optuna"  # "gradient": one more warm start, placed by `search.placement.gradient`
    grad_iters: int = 100
    grad_lr: float = 0.05
    grad_lr_decay: str = "constant"  # or "cosine" (`search.placement.gradient.GradientConfig.lr_decay`)
    grad_loss: str = "mse"
    slack_radius: float = 0.0
    data: str | None = None  # the user's images for an inversion objective (`search.sweep.data`); None: the model's
    # After the search: the best trial's steps and a per-step model time shift learned together by gradient
    # (``shift_iters`` iterations of ``shift_batch`` seeds, ``shift_lr_decay``; ``grad_lr``, ``grad_loss``,
    # ``slack_radius``), one more trial; with ``objective = "inversion"`` the steps stay and the encoder's and
    # decoder's shifts are learned on the tuning images' round trip (`search.placement.inversion_shift`).
    # Validation decides whether it is exported.
    time_shift: bool = False
    shift_iters: int = DEFAULTS["shift_iters"]
    # Seeds per Adam step (0: all the tuning seeds): `search.placement.gradient.GradientConfig.batch_seeds`, of
    # ``method = "gradient"`` (grad_batch) and of the time-shift stage (shift_batch).
    grad_batch: int = DEFAULTS["grad_batch"]
    shift_batch: int = DEFAULTS["shift_batch"]
    shift_lr_decay: str = DEFAULTS["shift_lr_decay"]
    shift_sides: str = DEFAULTS["shift_sides"]  # objective inversion: "encoder" learns the encoder's shifts only
    grad_init: str = "uniform"  # where the gradient placement starts: uniform steps, or the DP placement ("dp")
    inversion_pair: str = "symmetric"  # "joint": after the search, the encoder searched with the decoder (`search.placement.pair`)
    pair_evals: int = 60  # round trips the joint pair search may evaluate on the tuning images

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise StridelabError(msg)

        need(isinstance(self.nfe, int) and self.nfe >= 1, f"`nfe` must be an integer >= 1, got {self.nfe!r}")
        need(self.dtype in DTYPES, f"`dtype` must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        need(self.solver in SOLVERS, f"`solver` must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        if self.baselines is None:  # frozen: resolve the solver's default warm starts once
            object.__setattr__(self, "baselines", baselines_for(self.solver))
        need(self.trials >= 1, f"`trials` must be >= 1, got {self.trials}")
        need(self.parallel >= 1, f"`parallel` must be >= 1, got {self.parallel}")
        need(self.sampler in SAMPLERS, f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        need(self.space in SPACES, f"unknown search space {self.space!r}; choose one of {', '.join(SPACES)}")
        need(self.objective in OBJECTIVES, f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        need(2 <= self.num_seeds < HOLDOUT_OFFSET, f"`num_seeds` must be in [2, {HOLDOUT_OFFSET}), got {self.num_seeds}")
        need(1 <= self.holdout_seeds < HOLDOUT_OFFSET, f"`holdout_seeds` must be in [1, {HOLDOUT_OFFSET}), got {self.holdout_seeds}")
        need(isinstance(self.validation_seeds, int) and 0 <= self.validation_seeds < HOLDOUT_OFFSET,
             f"`validation_seeds` must be an integer in [0, {HOLDOUT_OFFSET}), got {self.validation_seeds!r}")
        need(0 < self.prune_p < 1, f"prune p-value threshold must be in (0, 1), got {self.prune_p}")
        need(0 <= self.screen_seeds < self.num_seeds, f"`screen_seeds` must be in [0, {self.num_seeds}), got {self.screen_seeds}")
        bad = [b for b in self.baselines if b not in ALL_BASELINES]
        need(not bad, f"unknown baseline {bad[0]!r}; choose from {', '.join(ALL_BASELINES)}" if bad else "")
        need(len(self.baselines) <= self.trials,
             f"`trials` ({self.trials}) must cover the {len(self.baselines)} warm-start trials (baselines and dp)")
        need(self.method in METHODS, f"unknown `method` {self.method!r}; choose one of {', '.join(METHODS)}")
        for name in ("grad_batch", "shift_batch"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                 f"`{name}` must be an integer >= 0 (0: all the tuning seeds), got {v!r}")
        if self.time_shift:
            from pipeline.evaluation.gradient import DIFFERENTIABLE

            need(self.objective in ("recon", "inversion"), "`time_shift` lowers the recon of sampling (`objective` "
                 f"recon) or the DDIM round trip (`objective` inversion), got `objective` {self.objective}")
            if self.objective == "recon":
                need(self.solver in DIFFERENTIABLE, f"`time_shift` is learned by gradient through "
                     f"{', '.join(DIFFERENTIABLE)} only, not {self.solver}")
            else:  # the round trip is DDIM's whatever the solver; its loss is the round trip's own MSE
                need(self.grad_loss == "mse" and self.slack_radius == 0,
                     "`time_shift` with `objective` inversion learns on the round trip's MSE: it takes no `grad_loss` "
                     f"other than mse and no `slack_radius` (got {self.grad_loss}, {self.slack_radius})")
                need(self.inversion_pair == "symmetric", "`time_shift` learns shifts for the searched steps both ways; "
                     "`inversion_pair` joint gives the encoder other steps: choose one")
            need(isinstance(self.shift_iters, int) and not isinstance(self.shift_iters, bool) and self.shift_iters >= 1,
                 f"`shift_iters` must be an integer >= 1, got {self.shift_iters!r}")
            from search.placement.gradient import LR_DECAYS

            need(self.shift_lr_decay in LR_DECAYS,
                 f"unknown `shift_lr_decay` {self.shift_lr_decay!r}; choose one of {', '.join(LR_DECAYS)}")
            self.gradient_config(time_shift=True)  # validates the gradient settings it uses
        from search.placement.inversion_shift import SIDES

        need(self.shift_sides in SIDES, f"unknown `shift_sides` {self.shift_sides!r}; choose one of {', '.join(SIDES)}")
        need(self.shift_sides == "both" or (self.time_shift and self.objective == "inversion"),
             "`shift_sides` encoder chooses which of the round trip's shifts `time_shift` learns: it needs "
             "`time_shift` and `objective` inversion")
        if self.method == "gradient":
            self.gradient_config()  # validates the gradient settings
            from pipeline.evaluation.gradient import DIFFERENTIABLE

            need(self.solver in DIFFERENTIABLE, f"`method` gradient differentiates {', '.join(DIFFERENTIABLE)} only, "
                                                f"got `solver` {self.solver!r}")
            need(self.grad_init in GRAD_INITS,
                 f"unknown `grad_init` {self.grad_init!r}; choose one of {', '.join(GRAD_INITS)}")
            need(self.grad_init != "dp" or "dp" in self.baselines,
                 "`grad_init` dp starts from the DP placement: add dp to the warm starts (`baselines`)")
            need(len(self.baselines) + 1 <= self.trials,
                 f"`trials` ({self.trials}) must cover the {len(self.baselines) + 1} warm-start trials (baselines, dp "
                 "and the gradient placement)")
        need(isinstance(self.polish, int) and self.polish >= 0, f"`polish` must be an integer >= 0, got {self.polish!r}")
        if Objective(self.objective, self.fid_weight).multi:
            need(self.sampler != "cmaes", "sampler cmaes is single-objective; use nsga2, tpe or random for two objectives")
        Objective(self.objective, self.fid_weight)
        need(self.inversion_pair in INVERSION_PAIRS,
             f"unknown `inversion_pair` {self.inversion_pair!r}; choose one of {', '.join(INVERSION_PAIRS)}")
        need(self.inversion_pair == "symmetric" or self.objective == "inversion",
             f"`inversion_pair` joint searches the round trip's encoder: it needs `objective` inversion, got {self.objective!r}")
        need(isinstance(self.pair_evals, int) and not isinstance(self.pair_evals, bool) and self.pair_evals >= 2,
             f"`pair_evals` must be an integer >= 2, got {self.pair_evals!r}")
        need(self.data is None or Objective(self.objective, self.fid_weight).needs_inversion,
             f"`data` holds images to round-trip: it needs `objective` inversion or recon,inversion, got {self.objective!r}")

    def gradient_config(self, time_shift: bool = False):
        """The `search.placement.gradient.GradientConfig` of ``method = "gradient"``, or with `time_shift` of the
        ``time_shift`` stage (the same learning rate, loss and slack; its own ``shift_iters``, ``shift_batch`` and
        ``shift_lr_decay``)."""
        from search.placement.gradient import GradientConfig

        return GradientConfig(iters=self.shift_iters if time_shift else self.grad_iters, lr=self.grad_lr,
                              slack_radius=self.slack_radius, loss=self.grad_loss,
                              lr_decay=self.shift_lr_decay if time_shift else self.grad_lr_decay,
                              time_shift=time_shift, batch_seeds=self.shift_batch if time_shift else self.grad_batch)

    @property
    def warm_trials(self) -> int:
        """Trials added before the search: the baselines (dp included) and, with ``method = "gradient"``, one more."""
        return len(self.baselines) + (self.method == "gradient")

    @property
    def steps(self) -> int:
        """Steps of every schedule of the sweep: the most whose model evaluations fit in `nfe` (Heun: (nfe + 1) // 2)."""
        return get_solver(self.solver).steps_for_budget(self.nfe)

    @property
    def tuning_seeds(self) -> list[int]:
        return list(range(self.seed, self.seed + self.num_seeds))

    @property
    def validation_seed_list(self) -> list[int]:
        start = self.seed + VALIDATION_OFFSET
        return list(range(start, start + self.validation_seeds))

    @property
    def holdout_seed_list(self) -> list[int]:
        start = self.seed + HOLDOUT_OFFSET
        return list(range(start, start + self.holdout_seeds))

    @property
    def validating(self) -> bool:
        """Whether the exported trial is chosen on validation seeds (single objective only: a Pareto front has
        no one best to validate; `search.sweep.select`)."""
        return self.validation_seeds > 0 and not Objective(self.objective, self.fid_weight).multi

    @property
    def pruning(self) -> bool:
        """The Wilcoxon screen runs for a single per-seed objective (recon, inversion), not for FID."""
        return self.prune and self.objective in ("recon", "inversion")

    @property
    def polish_trials(self) -> int:
        """Trials of the polish phase: `polish`, capped to `POLISH_SHARE` of what the warm starts leave; 0 for
        two objectives (a single-step move has no single 'better' on a Pareto front)."""
        if Objective(self.objective, self.fid_weight).multi:
            return 0
        return min(self.polish, int(POLISH_SHARE * (self.trials - len(self.baselines))))  # exact: a Fraction

    @property
    def search_trials(self) -> int:
        """Trials the Optuna sampler proposes: what the warm starts and the polish phase leave."""
        return self.trials - self.warm_trials - self.polish_trials

    def budget_note(self) -> str | None:
        """One line when `polish_trials` is not the `polish` asked for, else None."""
        if self.polish_trials == self.polish:
            return None
        if Objective(self.objective, self.fid_weight).multi:
            return f"`polish` {self.polish} ignored: polish needs a single objective, {self.objective!r} has two"
        return (f"`polish` {self.polish} capped to {self.polish_trials}: polish takes at most "
                f"{POLISH_SHARE} of the {self.trials - len(self.baselines)} `trials` after the warm starts")

    @property
    def n_screen(self) -> int:
        """Tuning seeds of the pruning screen: `screen_seeds`, or when 0 a quarter of them (at least
        `AUTO_SCREEN_MIN`), always leaving at least one seed for the rest stage.

        The automatic size is clamped rather than rejected: 0 is the default, so a small `num_seeds` must
        not turn a setting nobody chose into an error; an explicit `screen_seeds` >= `num_seeds` is rejected
        in `__post_init__`.
        """
        return self.screen_seeds or min(max(AUTO_SCREEN_MIN, self.num_seeds // 4), self.num_seeds - 1)


@dataclass
class SweepResult:
    study_name: str
    best: Schedule
    best_trial: int
    rows: list[dict[str, Any]]
    export_path: Path | None
    out_dir: Path
    parent_run_id: str | None
    tracking_uri: str | None
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)
