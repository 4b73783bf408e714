"""The step-placement sweep: Optuna ask/tell in batches over an evaluator, tracked in MLflow.

Flow of `run_sweep`:

1. Open (or resume) the study; mark RUNNING trials left by a killed driver FAIL (`search.study`).
2. Warm starts: every baseline of `pipeline.core.schedules.SCHEDULES` and the DP placement (`search.placement.dp`) is
   evaluated on all tuning seeds and added with ``study.add_trial`` (params from ``space.params_of``,
   user attr ``kind = "baseline"``). They are ordinary trials of the study: the sampler learns from
   them and the best trial is never worse than the best of them on the tuning seeds.
3. Search: ``study.ask()`` `parallel` trials, build their schedules, evaluate them in one
   ``evaluate(list)`` call, ``study.tell`` each. A schedule that raises or gives NaN is told FAIL and
   the sweep goes on. Trials are counted as in `search.study` (exactly `trials` in total).
   The last `polish` trials (single objective only) refine the best schedule so far on the integer
   timestep grid by compass search (`search.placement.polish`): each batch enqueues untried single-step moves of
   the incumbent (params of the ``steps`` space, user attr ``kind = "polish"``), so the global phase
   finds the basin and the polish phase the placement no few-parameter family can express.
4. Pruning (objective ``recon`` only): a batch is first evaluated on the first `screen_seeds` tuning
   seeds. A trial is told PRUNED when its per-seed errors there are worse than the best trial's on the
   same seeds by a one-sided Wilcoxon signed-rank test (p < `prune_p`, the test Optuna's WilcoxonPruner
   uses); survivors are evaluated on the remaining seeds and told the mean over all tuning seeds.
   Per-seed results do not depend on batching, so screen + rest equals one evaluation on all seeds.
5. Honest numbers: the best trial's schedule and every warm start are re-evaluated on held-out seeds
   (a disjoint range starting at ``seed + HOLDOUT_OFFSET``), printed as a table and logged.
6. Artifacts (in ``out_dir`` and on the MLflow parent run): best schedule JSON (`search.export`),
   Parquet table of every trial, comparison CSV, steps plot, history / Pareto plot, sample grids.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.trial import TrialState

from pipeline.errors import StridelabError
from pipeline.evaluation.inprocess import ScheduleResult
from pipeline.models.load import LoadedModel
from pipeline.core.schedules import SCHEDULES, Schedule, check_nfe, make_schedule, uniform
from search.evaluators import OBJECTIVES, EvaluatorFactory, Objective, TrialFailed
from search.placement.polish import next_candidates, step_ladder
from search.space import SPACES, make_space
from search.study import (SAMPLERS, fail_stale_running, finished_count, make_sampler, make_storage, missing_store,
                          open_study)

from search.defaults import DEFAULT_MODEL, DEFAULTS

HOLDOUT_OFFSET = 1_000_000
"""Held-out seeds start here (plus --seed): disjoint from any tuning range shorter than this."""

DEFAULT_BASELINES: tuple[str, ...] = (*SCHEDULES, "dp")
ALL_BASELINES: tuple[str, ...] = (*DEFAULT_BASELINES, "dp_free")
"""Warm starts a sweep accepts: the default ones and ``dp_free`` (the DP choosing its start, `search.placement.dp`)."""

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass(frozen=True)
class SweepConfig:
    """What a sweep does (everything that changes its numbers); logged as the parent run's params."""

    model: str = DEFAULT_MODEL
    nfe: int = DEFAULTS["nfe"]
    trials: int = DEFAULTS["trials"]
    parallel: int = DEFAULTS["parallel"]
    sampler: str = DEFAULTS["sampler"]
    space: str = DEFAULTS["space"]
    objective: str = DEFAULTS["objective"]
    fid_weight: float = DEFAULTS["fid_weight"]
    num_seeds: int = DEFAULTS["num_seeds"]
    holdout_seeds: int = DEFAULTS["holdout_seeds"]
    seed: int = DEFAULTS["seed"]
    baselines: tuple[str, ...] = DEFAULT_BASELINES
    prune: bool = True
    screen_seeds: int = DEFAULTS["screen_seeds"]
    prune_p: float = 0.05
    teacher_nfe: int | None = DEFAULTS["teacher_nfe"]
    polish: int = DEFAULTS["polish"]
    dp_seeds: int = 64
    dp_grid: int = 160
    grid_seeds: int = 64
    holdout_fid: bool = True

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise StridelabError(msg)

        need(isinstance(self.nfe, int) and self.nfe >= 1, f"`nfe` must be an integer >= 1, got {self.nfe!r}")
        need(self.trials >= 1, f"`trials` must be >= 1, got {self.trials}")
        need(self.parallel >= 1, f"`parallel` must be >= 1, got {self.parallel}")
        need(self.sampler in SAMPLERS, f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        need(self.space in SPACES, f"unknown search space {self.space!r}; choose one of {', '.join(SPACES)}")
        need(self.objective in OBJECTIVES, f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        need(2 <= self.num_seeds < HOLDOUT_OFFSET, f"`num_seeds` must be in [2, {HOLDOUT_OFFSET}), got {self.num_seeds}")
        need(self.holdout_seeds >= 1, f"`holdout_seeds` must be >= 1, got {self.holdout_seeds}")
        need(0 < self.prune_p < 1, f"prune p-value threshold must be in (0, 1), got {self.prune_p}")
        need(0 <= self.screen_seeds < self.num_seeds, f"`screen_seeds` must be in [0, {self.num_seeds}), got {self.screen_seeds}")
        bad = [b for b in self.baselines if b not in ALL_BASELINES]
        need(not bad, f"unknown baseline {bad[0]!r}; choose from {', '.join(ALL_BASELINES)}" if bad else "")
        need(len(self.baselines) <= self.trials,
             f"`trials` ({self.trials}) must cover the {len(self.baselines)} warm-start trials (baselines and dp)")
        need(isinstance(self.polish, int) and self.polish >= 0, f"`polish` must be an integer >= 0, got {self.polish!r}")
        if self.objective == "recon,fid":
            need(self.sampler != "cmaes", "sampler cmaes is single-objective; use nsga2, tpe or random for two objectives")
        Objective(self.objective, self.fid_weight)

    @property
    def tuning_seeds(self) -> list[int]:
        return list(range(self.seed, self.seed + self.num_seeds))

    @property
    def holdout_seed_list(self) -> list[int]:
        start = self.seed + HOLDOUT_OFFSET
        return list(range(start, start + self.holdout_seeds))

    @property
    def pruning(self) -> bool:
        return self.prune and self.objective == "recon"

    @property
    def polish_trials(self) -> int:
        """Trials of the polish phase: `polish`, capped to what the warm starts leave; 0 for two objectives
        (a single-step move has no single 'better' on a Pareto front)."""
        if Objective(self.objective, self.fid_weight).multi:
            return 0
        return min(self.polish, self.trials - len(self.baselines))

    @property
    def n_screen(self) -> int:
        return self.screen_seeds or max(8, self.num_seeds // 4)


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


def _combine(a: ScheduleResult, b: ScheduleResult) -> ScheduleResult:
    """Screen-stage + rest-stage results of one schedule as one result on all tuning seeds."""
    inv = torch.cat([a.inversion, b.inversion]) if a.inversion is not None and b.inversion is not None else None
    return ScheduleResult(a.schedule, torch.cat([a.recon, b.recon]), inv, a.seconds + b.seconds, None)


def _safe_evaluate(ev: Any, schedules: list[Schedule]) -> list[ScheduleResult | Exception]:
    """Evaluate a batch; if the batch raises, evaluate one by one so one bad schedule fails only itself."""
    if not schedules:
        return []
    try:
        return list(ev.evaluate(schedules))
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # trial isolation in the driver: a failing trial must not end the sweep
        if len(schedules) == 1:
            return [e]
    return [_safe_evaluate(ev, [s])[0] for s in schedules]


def screen_is_worse(trial_errs: np.ndarray, best_errs: np.ndarray, p_threshold: float) -> tuple[bool, float]:
    """One-sided Wilcoxon signed-rank test that `trial_errs` > `best_errs` (paired by seed): (prune?, p)."""
    from scipy.stats import wilcoxon

    d = np.asarray(trial_errs, dtype=np.float64) - np.asarray(best_errs, dtype=np.float64)
    if d.mean() <= 0 or not np.any(d != 0):
        return False, 1.0
    p = float(wilcoxon(d, alternative="greater", zero_method="zsplit").pvalue)
    return p < p_threshold, p


class Sweep:
    """One sweep invocation (see the module docstring). Use `run_sweep`."""

    def __init__(self, cfg: SweepConfig, model: LoadedModel, evaluators: Callable[[Sequence[int]], Any],
                 study: optuna.Study, tracker: Any, log: Callable[[str], None] = print):
        self.cfg, self.model, self.study, self.tracker, self.log = cfg, model, study, tracker, log
        self.objective = Objective(cfg.objective, cfg.fid_weight)
        self.space = make_space(cfg.space, cfg.nfe, model.alphas_cumprod)
        self.polish_space = make_space("steps", cfg.nfe, model.alphas_cumprod)
        self.ladder = step_ladder(model.num_train_timesteps)
        self.make_evaluator = evaluators
        seeds = cfg.tuning_seeds
        if cfg.pruning:
            self.screen = evaluators(seeds[: cfg.n_screen])
            self.rest = evaluators(seeds[cfg.n_screen :])
        else:
            self.screen, self.rest = None, evaluators(seeds)
        self.per_seed: dict[int, np.ndarray] = {
            t.number: np.asarray(t.user_attrs["recon_per_seed"])
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if "recon_per_seed" in t.user_attrs
        }

    # -- evaluation ---------------------------------------------------------------------------------
    def evaluate_full(self, schedules: list[Schedule]) -> list[ScheduleResult | Exception]:
        if self.screen is None:
            return _safe_evaluate(self.rest, schedules)
        a = _safe_evaluate(self.screen, schedules)
        b = _safe_evaluate(self.rest, schedules)
        return [x if isinstance(x, Exception) else y if isinstance(y, Exception) else _combine(x, y) for x, y in zip(a, b)]

    def _record(self, trial: optuna.Trial | None, sched: Schedule, res: ScheduleResult) -> tuple[dict, list[float]]:
        """Metrics and objective values of one result; raises TrialFailed."""
        m = self.objective.metrics(res)
        vals = self.objective.values(m)
        if not all(math.isfinite(v) for v in vals):
            raise TrialFailed("non-finite objective")
        return m, vals

    def _attrs(self, sched: Schedule, m: dict[str, float] | None, res: ScheduleResult | None) -> dict[str, Any]:
        ua: dict[str, Any] = {"schedule": sched.name, "timesteps": list(sched.timesteps),
                              "sigmas": [float(v) for v in sched.sigmas(self.model.alphas_cumprod)]}
        if m:
            ua.update(m)
        if res is not None:
            ua["seconds"] = float(res.seconds)
            ua["recon_per_seed"] = [float(v) for v in res.recon.double()]
        return ua

    def _track(self, number: int, state: str, sched: Schedule | None, params: dict, ua: dict, kind: str) -> None:
        if self.tracker is None:
            return
        p = {"kind": kind, "space": "steps" if kind == "polish" else self.cfg.space,
             "sampler": "compass" if kind == "polish" else self.cfg.sampler,
             **{f"p.{k}": round(float(v), 6) for k, v in params.items()}}
        if sched is not None:
            p.update(schedule=sched.name, timesteps=" ".join(map(str, sched.timesteps)))
        metrics = {k: ua.get(k) for k in ("recon", "fid", "seconds", "screen_recon", "screen_p")}
        self.tracker.log_trial(number, state, p, metrics)

    # -- warm starts --------------------------------------------------------------------------------
    def warm_start(self) -> None:
        have = {t.user_attrs.get("schedule") for t in self.study.get_trials(deepcopy=False)
                if t.user_attrs.get("kind") == "baseline"}
        todo = [b for b in self.cfg.baselines if b not in have]
        dps: dict[str, Schedule] = {}
        if {"dp", "dp_free"} & set(todo):  # a resumed study already has its dp trials
            t0 = time.perf_counter()
            from search.placement.dp import dp_schedule, teacher_trajectory

            traj = teacher_trajectory(self.model, self.cfg.tuning_seeds[: self.cfg.dp_seeds], self.cfg.teacher_nfe,
                                      self.cfg.dp_grid)
            self.log(f"dp teacher trajectory on {len(traj.grid)} grid points: {time.perf_counter() - t0:.1f} s")
            for name in ("dp", "dp_free"):
                if name in todo:
                    t0 = time.perf_counter()  # each placement's own time (both share the trajectory above)
                    dps[name] = dp_schedule(self.model, self.cfg.nfe, traj=traj, free_start=name == "dp_free")
                    self.log(f"{name} placement ({time.perf_counter() - t0:.1f} s): {list(dps[name].timesteps)}")
        if not todo:
            return
        scheds = [dps[b] if b in dps else make_schedule(b, self.cfg.nfe, self.model.alphas_cumprod) for b in todo]
        results = self.evaluate_full(scheds)
        dists = self.space.distributions()
        for sched, res in zip(scheds, results):
            params = self.space.params_of(sched)
            exact = self.space.build(params).timesteps == sched.timesteps
            ua: dict[str, Any] = {"kind": "baseline", "params_exact": exact}
            state, values = TrialState.FAIL, None
            try:
                if isinstance(res, Exception):
                    raise TrialFailed(f"{type(res).__name__}: {res}")
                m, values = self._record(None, sched, res)
                ua.update(self._attrs(sched, m, res))
                state = TrialState.COMPLETE
            except TrialFailed as e:
                ua.update(self._attrs(sched, None, None), error=str(e))
            ft = optuna.trial.create_trial(params=params, distributions=dists, values=values, state=state, user_attrs=ua)
            self.study.add_trial(ft)
            number = self.study.get_trials(deepcopy=False)[-1].number
            if state == TrialState.COMPLETE:
                self.per_seed[number] = np.asarray(ua["recon_per_seed"])
            self._track(number, state.name, sched, params, ua, "baseline")

    # -- search -------------------------------------------------------------------------------------
    def _best_screen(self) -> np.ndarray | None:
        try:
            best = self.study.best_trial
        except ValueError:
            return None
        errs = self.per_seed.get(best.number)
        return None if errs is None else errs[: self.cfg.n_screen]

    def _fail(self, trial: optuna.Trial, sched: Schedule | None, err: str) -> None:
        kind = trial.user_attrs.get("kind", "search")
        trial.set_user_attr("kind", kind)
        trial.set_user_attr("error", err[:500])
        if sched is not None:
            trial.set_user_attr("schedule", sched.name)
            trial.set_user_attr("timesteps", list(sched.timesteps))
        self.study.tell(trial, state=TrialState.FAIL)
        self._track(trial.number, "FAIL", sched, trial.params, {"error": err}, kind)

    def run_batch(self, k: int) -> None:
        trials = [self.study.ask() for _ in range(k)]
        live: list[tuple[optuna.Trial, Schedule]] = []
        for trial in trials:
            space = self.polish_space if trial.user_attrs.get("kind") == "polish" else self.space
            try:
                live.append((trial, space.suggest(trial)))
            except (StridelabError, ValueError) as e:
                self._fail(trial, None, f"bad schedule: {e}")
        screen_res: dict[int, ScheduleResult] = {}
        if self.screen is not None and live:
            best = self._best_screen()
            kept = []
            for (trial, sched), res in zip(live, _safe_evaluate(self.screen, [s for _, s in live])):
                if isinstance(res, Exception):
                    self._fail(trial, sched, f"{type(res).__name__}: {res}")
                    continue
                errs = res.recon.double().numpy()
                mean = float(errs.mean())
                if not math.isfinite(mean):
                    self._fail(trial, sched, "non-finite recon")
                    continue
                screen_res[trial.number] = res
                trial.report(mean, len(errs))
                prune, p = (False, 1.0) if best is None else screen_is_worse(errs, best, self.cfg.prune_p)
                if prune:
                    kind = trial.user_attrs.get("kind", "search")
                    ua = {"kind": kind, "screen_recon": mean, "screen_p": p, "seconds": float(res.seconds),
                          **self._attrs(sched, None, None)}
                    for key, v in ua.items():
                        trial.set_user_attr(key, v)
                    self.study.tell(trial, state=TrialState.PRUNED)
                    self._track(trial.number, "PRUNED", sched, trial.params, ua, kind)
                else:
                    kept.append((trial, sched))
            live = kept
        rest = _safe_evaluate(self.rest, [s for _, s in live])
        for (trial, sched), res in zip(live, rest):
            if isinstance(res, Exception):
                self._fail(trial, sched, f"{type(res).__name__}: {res}")
                continue
            if trial.number in screen_res:
                res = _combine(screen_res[trial.number], res)
            try:
                m, vals = self._record(trial, sched, res)
            except TrialFailed as e:
                self._fail(trial, sched, str(e))
                continue
            kind = trial.user_attrs.get("kind", "search")
            ua = {"kind": kind, **self._attrs(sched, m, res)}
            if trial.number in screen_res:
                ua["screen_recon"] = float(screen_res[trial.number].recon.double().mean())
            for key, v in ua.items():
                trial.set_user_attr(key, v)
            self.study.tell(trial, vals if self.objective.multi else vals[0])
            self.per_seed[trial.number] = np.asarray(ua["recon_per_seed"])
            self._track(trial.number, "COMPLETE", sched, trial.params, ua, kind)

    def enqueue_polish(self, k: int) -> None:
        """Enqueue up to `k` compass-search moves of the best trial (fewer if some are already WAITING,
        e.g. enqueued by a driver that was stopped before asking them)."""
        trials = self.study.get_trials(deepcopy=False)
        waiting = [t for t in trials if t.state == TrialState.WAITING]
        need = k - len(waiting)
        if need <= 0:
            return
        try:
            bt = self.study.best_trial
        except ValueError:
            return  # nothing to refine yet: the batch falls back to the global sampler
        keys = self.polish_space.keys
        tried = {tuple(t.user_attrs["timesteps"]) for t in trials if "timesteps" in t.user_attrs}
        tried |= {tuple(int(t.system_attrs["fixed_params"][key]) for key in keys) for t in waiting
                  if set(keys) <= set(t.system_attrs.get("fixed_params", {}))}
        step = int(bt.user_attrs.get("polish_step", self.ladder[0]))
        rng = np.random.default_rng([self.cfg.seed, len(trials)])
        inc = bt.user_attrs["timesteps"]
        parent = trials[bt.user_attrs["polish_from"]] if "polish_from" in bt.user_attrs else None
        move = [a - b for a, b in zip(inc, parent.user_attrs["timesteps"])] if parent is not None else None
        for ts, s in next_candidates(inc, step, tried, need, self.model.num_train_timesteps, self.ladder, rng, move):
            self.study.enqueue_trial(dict(zip(keys, ts)),
                                     user_attrs={"kind": "polish", "polish_step": s, "polish_from": bt.number})

    def search(self) -> None:
        # CMA-ES starts from the warm starts (WS-CMA-ES) instead of the middle of the box.
        if self.cfg.sampler == "cmaes":
            src = [t for t in self.study.get_trials(states=(TrialState.COMPLETE,)) if t.user_attrs.get("kind") == "baseline"]
            self.study.sampler = make_sampler("cmaes", self.cfg.seed, source_trials=src)
        t0, start = time.perf_counter(), finished_count(self.study)
        global_end = self.cfg.trials - self.cfg.polish_trials
        while (done := finished_count(self.study)) < self.cfg.trials:
            if done < global_end:
                self.run_batch(min(self.cfg.parallel, global_end - done))
            else:
                k = min(self.cfg.parallel, self.cfg.trials - done)
                self.enqueue_polish(k)
                self.run_batch(k)
            n = finished_count(self.study)
            if self.objective.multi:
                best = f"Pareto front {len(self.study.best_trials)}"
            else:
                try:
                    best = f"best {self.study.best_value:.4g}"
                except ValueError:
                    best = "no complete trial yet"
            self.log(f"  trials {n}/{self.cfg.trials}  {best}  ({time.perf_counter() - t0:.0f} s)")
        if finished_count(self.study) > start:
            self.log(f"search: {finished_count(self.study) - start} trials in {time.perf_counter() - t0:.1f} s")


def state_counts(study: optuna.Study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def default_study_name(cfg: SweepConfig) -> str:
    safe = "".join(c if c.isalnum() else "-" for c in cfg.model).strip("-")
    return f"{safe}-nfe{cfg.nfe}-{cfg.space}-{cfg.objective.replace(',', '_').replace('+', 'p')}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_sweep(
    cfg: SweepConfig,
    *,
    study_name: str | None = None,
    storage: str | None = None,
    resume: bool = False,
    out_dir: str | Path = "results/sweep",
    tracking_uri: str | None = None,
    experiment: str | None = None,
    track: bool = True,
    actors: int = 0,
    ray_address: str | None = None,
    gpus_per_actor: float | None = None,
    model: LoadedModel | None = None,
    evaluators: Callable[[Sequence[int]], Any] | None = None,
    figures: bool = True,
    log: Callable[[str], None] = print,
) -> SweepResult:
    """Run (or resume) a sweep end to end; see the module docstring.

    Args:
        cfg: the sweep's settings.
        study_name: default: model, NFE, space, objective and a timestamp.
        storage: Optuna storage, a journal file path or an RDB URL (default ``<out_dir>/optuna.journal``).
        resume: continue `study_name` up to ``cfg.trials`` trials in total.
        out_dir: root of the outputs; this sweep writes into ``<out_dir>/<study_name>/``.
        tracking_uri, experiment: MLflow (default sqlite in the working directory); `track` False: none.
        actors, ray_address: the evaluator (0 = in this process).
        gpus_per_actor: GPUs each actor requests as given (autoscaling clusters; see `EvaluatorFactory`).
        model: an already loaded model (default: ``load_model(cfg.model)``).
        evaluators: ``seeds -> evaluator`` (default `EvaluatorFactory`); tests inject stand-ins here.
        figures: draw the plots and sample grids (the JSON, CSV and Parquet outputs are always written).
    """
    from pipeline import __version__
    from pipeline.models.load import load_model
    from pipeline.io.reports import format_table, short_steps, write_table
    from search import export, plots
    from search.tracking import DEFAULT_EXPERIMENT, Tracker, default_tracking_uri, ui_command

    t_start = time.perf_counter()
    missing = missing_store(storage or Path(out_dir) / "optuna.journal") if resume else None
    if missing is not None:  # before opening it, which would create an empty store
        raise StridelabError(f"`resume`: no study named {study_name!r}: {missing} does not exist")
    model = model or load_model(cfg.model)
    check_nfe(cfg.nfe, model.num_train_timesteps)
    objective = Objective(cfg.objective, cfg.fid_weight)
    out_root = Path(out_dir)
    storage_spec = storage or str(out_root / "optuna.journal")
    study_name = study_name or default_study_name(cfg)
    sampler = make_sampler(cfg.sampler, cfg.seed, multi_objective=objective.multi)
    identity = {"model": cfg.model, "nfe": cfg.nfe, "space": cfg.space, "objective": cfg.objective,
                "num_train_timesteps": model.num_train_timesteps,
                "alphas_cumprod_sha256": export.alphas_cumprod_sha256(model.alphas_cumprod),
                "tuning_seeds": [cfg.seed, cfg.num_seeds], "teacher_nfe": cfg.teacher_nfe}
    study = open_study(make_storage(storage_spec), study_name, objective.directions, sampler, identity, resume)
    stale = fail_stale_running(study) if resume else []
    if stale:
        log(f"resume: trials {stale} were left RUNNING by a stopped driver: marked FAIL, not counted")
    run_dir = out_root / study_name
    run_dir.mkdir(parents=True, exist_ok=True)

    tracker = None
    if track:
        tracking_uri = tracking_uri or default_tracking_uri()
        tracker = Tracker(tracking_uri, experiment or DEFAULT_EXPERIMENT)
        if resume:  # a driver killed mid-run never ended its MLflow runs
            closed = tracker.close_stale(study.user_attrs.get("mlflow_parent_runs", []))
            if closed:
                log(f"resume: MLflow runs {closed} were left RUNNING by a stopped driver: marked KILLED")
        tracker.start(study_name, {**asdict(cfg), "study_name": study_name, "storage": storage_spec, "resume": resume,
                                   "actors": actors, "gpus_per_actor": gpus_per_actor,
                                   "stridelab_version": __version__},
                      tags={"stridelab.kind": "sweep", "study": study_name})
        study.set_user_attr("mlflow_parent_runs", [*study.user_attrs.get("mlflow_parent_runs", []), tracker.run_id])
        study.set_user_attr("mlflow_tracking_uri", tracking_uri)

    factory = None
    if evaluators is None:
        factory = EvaluatorFactory(model, actors, ray_address, cfg.teacher_nfe, fid=objective.needs_fid, log=log,
                                   gpus_per_actor=gpus_per_actor)
        evaluators = factory
        log(f"evaluator: {factory.kind}; teacher {cfg.teacher_nfe or model.num_train_timesteps}-step DDIM")
    status = "FAILED"
    try:
        t0 = time.perf_counter()
        sweep = Sweep(cfg, model, evaluators, study, tracker, log)
        log(f"study {study_name} ({storage_spec}): {finished_count(study)} trials so far; "
            f"teachers on {cfg.num_seeds} tuning seeds: {time.perf_counter() - t0:.1f} s")
        sweep.warm_start()
        sweep.search()

        # -- honest numbers on held-out seeds ------------------------------------------------------
        bt = export.best_trial(study)
        best = export.schedule_of_trial(bt, model.num_train_timesteps)
        learned_name = "learned" if bt.user_attrs.get("kind") != "baseline" else f"learned (= {best.name})"
        learned = Schedule(best.timesteps, best.num_train_timesteps, "learned",
                           {"space": "steps" if bt.user_attrs.get("kind") == "polish" else cfg.space,
                            **{k: float(v) for k, v in bt.params.items()}})
        warm = {t.user_attrs["schedule"]: export.schedule_of_trial(t, model.num_train_timesteps)
                for t in study.get_trials(deepcopy=False)
                if t.user_attrs.get("kind") == "baseline" and t.state == TrialState.COMPLETE}
        named = {learned_name: learned, **warm}
        for ev in {id(e): e for e in (sweep.screen, sweep.rest) if e is not None}.values():
            if factory is not None:
                factory.release(ev)  # the search is over: free its actors for the held-out pool
        t0 = time.perf_counter()
        hold_eval = None
        if factory is not None and cfg.holdout_fid:
            try:
                hold_eval = factory(cfg.holdout_seed_list, fid=True)
            except StridelabError as e:
                log(f"no held-out FID: {e}")
        if hold_eval is not None:
            # The teacher's own row: its FID on the same seeds is the floor no NFE-n schedule can beat (with a
            # few hundred samples FID's bias dominates it), so the table can say how much of the gap is closed.
            n_teacher = cfg.teacher_nfe or model.num_train_timesteps
            named[f"teacher ({n_teacher}-step DDIM)"] = Schedule(
                uniform(n_teacher, model.alphas_cumprod).timesteps, model.num_train_timesteps, "teacher")
        hold_eval = hold_eval or evaluators(cfg.holdout_seed_list)
        hold = _safe_evaluate(hold_eval, list(named.values()))
        log(f"held-out evaluation on {cfg.holdout_seeds} seeds: {time.perf_counter() - t0:.1f} s")
        tuning = {t.user_attrs["schedule"]: t.user_attrs.get("recon") for t in study.get_trials(deepcopy=False)
                  if t.user_attrs.get("kind") == "baseline"}
        tuning[learned_name] = bt.user_attrs.get("recon")
        rows = []
        for (name, s), r in zip(named.items(), hold):
            row: dict[str, Any] = {"schedule": name, "nfe": s.nfe}
            if isinstance(r, Exception):
                row["error"] = str(r)
            else:
                row.update({f"holdout_{k}": v for k, v in objective_metrics(r).items()})
            row["tuning_recon"] = tuning.get(name)
            row["timesteps"] = " ".join(map(str, s.timesteps))
            rows.append(row)
        best_base: dict[str, float | None] = {}
        for metric, col in (("holdout_recon", "x_best_baseline"), ("holdout_fid", "fid_x_best_baseline")):
            best_base[metric] = min((r[metric] for r in rows if r["schedule"] in SCHEDULES and metric in r),
                                    default=None)
            for r in rows:
                if best_base[metric] and metric in r:
                    r[col] = r[metric] / best_base[metric]
        teacher_rows = [r for r in rows if r["schedule"].startswith("teacher (")]
        if teacher_rows and "holdout_fid" in teacher_rows[0]:
            floor, best_fid = teacher_rows[0]["holdout_fid"], best_base["holdout_fid"]
            for r in rows:
                if best_fid is not None and best_fid > floor and "holdout_fid" in r:
                    r["fid_gap_x_best_baseline"] = (r["holdout_fid"] - floor) / (best_fid - floor)
        others = [r for r in rows[1:] if r not in teacher_rows]
        rows = rows[:1] + sorted(others, key=lambda r: r.get("holdout_recon", math.inf)) + teacher_rows

        # -- outputs --------------------------------------------------------------------------------
        metrics = {k: v for k, v in rows[0].items() if k.startswith("holdout_") or k.endswith("x_best_baseline")}
        metrics.update({f"tuning_{k}": bt.user_attrs[k] for k in ("recon", "fid") if bt.user_attrs.get(k) is not None})
        prov = export.provenance(study=study_name, storage=storage_spec, trial=bt.number,
                                 mlflow_run_id=tracker.run_id if tracker else None,
                                 tuning_seeds=[cfg.seed, cfg.num_seeds],
                                 holdout_seeds=[cfg.seed + HOLDOUT_OFFSET, cfg.holdout_seeds])
        export_path = export.write_export(run_dir / "best_schedule.json",
                                          export.export_for_model(learned, model, metrics, prov))
        table_path = write_table(rows, run_dir / "comparison.csv")
        parquet_path = export.write_trials_parquet(study, run_dir / "trials.parquet")
        figs = []
        if figures:
            same_nfe = {k: v for k, v in named.items() if v.nfe == cfg.nfe}  # not the teacher's 250 steps
            figs += [plots.steps_plot(same_nfe, model.alphas_cumprod, run_dir / "steps.png", highlight="learned"),
                     plots.history_plot(study.get_trials(deepcopy=False), run_dir / "history.png", objective.multi)]
            if any("holdout_fid" in r for r in rows):
                figs.append(plots.holdout_plot(rows, run_dir / "holdout.png", highlight=learned_name))
            grid_seeds = cfg.holdout_seed_list[: cfg.grid_seeds]
            uniform_n = make_schedule("uniform", cfg.nfe, model.alphas_cumprod)
            figs.append(plots.sample_grid(model, {"uniform": uniform_n, "learned": learned}, grid_seeds,
                                          run_dir / "samples.png"))
        if tracker is not None:
            for p in [export_path, table_path, parquet_path, *figs]:
                tracker.log_artifact(p)
            tracker.log_metrics({**{k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                                 **{f"holdout_recon/{r['schedule'].replace(' ', '_').replace('(', '').replace(')', '').replace('=', 'eq')}": r["holdout_recon"]
                                    for r in rows if "holdout_recon" in r}})
            tracker.set_tag("best_trial", str(bt.number))
        status = "FINISHED"
        counts = state_counts(study)
        log("")
        log(format_table([{**r, "timesteps": short_steps(r["timesteps"], 10)} for r in rows], ["schedule", "nfe", "holdout_recon", "x_best_baseline", "holdout_fid",
                                "fid_x_best_baseline", "fid_gap_x_best_baseline", "tuning_recon",
                                "timesteps"]))
        log(f"\ntrials: {counts}; held-out seeds {cfg.holdout_seed_list[0]}..{cfg.holdout_seed_list[-1]}")
        log(f"exported schedule: {export_path}")
        log(f"trials table: {parquet_path}")
        if tracker is not None:
            log(f"MLflow run {tracker.run_id}: {ui_command(tracker.tracking_uri)}")
        return SweepResult(study_name, learned, bt.number, rows, export_path, run_dir,
                           tracker.run_id if tracker else None, tracker.tracking_uri if tracker else None,
                           time.perf_counter() - t_start, counts)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if tracker is not None:
            tracker.end(status)
        if factory is not None:
            factory.close()


def objective_metrics(r: ScheduleResult) -> dict[str, float]:
    out = {"recon": float(r.recon.double().mean())}
    for k, v in (r.extra or {}).items():
        out[k] = float(v)
    return out
