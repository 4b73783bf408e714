"""The sweep's loop (`Sweep`): warm starts, batches of ask / evaluate / tell, the pruning screen, polish moves.

Warm starts: every baseline of `pipeline.core.schedules.SCHEDULES` and the DP placement
(`search.placement.dp`) is evaluated on all tuning seeds and added with ``study.add_trial`` (params from
``space.params_of``, user attr ``kind = "baseline"``), so the sampler learns from them and the best trial
is never worse than the best of them on the tuning seeds.

Search: ``study.ask()`` `parallel` trials, build their schedules, evaluate them in one ``evaluate(list)``
call, ``study.tell`` each. A schedule that raises or gives NaN is told FAIL and the sweep goes on. Trials
are counted as in `search.study` (exactly `trials` in total). The last `SweepConfig.polish_trials` (single
objective only; `polish` capped so the sampler keeps a share of the budget) refine the best schedule so far on the integer timestep grid by compass search
(`search.placement.polish`): each batch enqueues untried single-step moves of the incumbent (params of the
``steps`` space, user attr ``kind = "polish"``).

Pruning (objectives ``recon`` and ``inversion``: the screen compares the objective's per-seed errors, user attr
``screen_recon`` is their mean on the screen seeds): see `search.sweep.pruning`; survivors are told the mean over all
tuning seeds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from pipeline.core.schedules import INVERSE_MODEL_SHIFT_KEY, MODEL_SHIFT_KEY, Schedule, make_schedule, with_noisiest_step
from pipeline.errors import StridelabError
from pipeline.evaluation.inprocess import ScheduleResult
from pipeline.io.console import progress
from pipeline.models.load import LoadedModel
from search.evaluators import Objective, TrialFailed
from search.placement.polish import next_candidates, step_ladder
from search.space import NoisiestPinned, make_space
from search.study import enqueued_params, finished_count, make_sampler
from search.sweep.config import SweepConfig
from search.sweep.pruning import combine, safe_evaluate, screen_is_worse


def _now_ms() -> int:
    return int(time.time() * 1000)


HEUN_DP_GRID = 48
"""Grid points of the DP for a solver with its own (two-evaluation) step cost."""


class Sweep:
    """One sweep invocation (see the module docstring). Use `run_sweep`."""

    def __init__(self, cfg: SweepConfig, model: LoadedModel, evaluators: Callable[[Sequence[int]], Any],
                 study: optuna.Study, tracker: Any, log: Callable[[str], None] = print):
        self.cfg, self.model, self.study, self.tracker, self.log = cfg, model, study, tracker, log
        self.objective = Objective(cfg.objective, cfg.fid_weight)
        self.space = make_space(cfg.space, cfg.steps, model.alphas_cumprod)
        self.polish_space = make_space("steps", cfg.steps, model.alphas_cumprod)
        # Inversion: a round trip that encodes less far is easier, not better; every schedule (warm starts
        # included) encodes to x_T, as in the DDIM paper's reconstruction protocol.
        self.pinned_top = model.num_train_timesteps - 1 if self.objective.needs_inversion else None
        if self.pinned_top is not None:
            self.space = NoisiestPinned(self.space, self.pinned_top)
            self.polish_space = NoisiestPinned(self.polish_space, self.pinned_top)
            log(f"inversion objective: every schedule's noisiest step is t = {self.pinned_top} (encodes to x_T)")
        self.ladder = step_ladder(model.num_train_timesteps)
        seeds = cfg.tuning_seeds
        if cfg.pruning:
            self.screen = evaluators(seeds[: cfg.n_screen])
            self.rest = evaluators(seeds[cfg.n_screen :])
        else:
            self.screen, self.rest = None, evaluators(seeds)
        for ev in (self.screen, self.rest):  # the teachers, before the first trial (a pool computes them async)
            getattr(ev, "wait_for_teachers", lambda: None)()
        self._span: dict[int, tuple[int, int]] = {}  # trial number -> its evaluation's (start, end), ms since epoch
        self._per_seed_key = f"{self.objective.per_seed_metric}_per_seed"  # what the pruning screen compares
        self.per_seed: dict[int, np.ndarray] = {
            t.number: np.asarray(t.user_attrs[self._per_seed_key])
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if self._per_seed_key in t.user_attrs
        }

    # -- evaluation ---------------------------------------------------------------------------------
    def evaluate_full(self, schedules: list[Schedule]) -> list[ScheduleResult | Exception]:
        if self.screen is None:
            return safe_evaluate(self.rest, schedules)
        a = safe_evaluate(self.screen, schedules)
        b = safe_evaluate(self.rest, schedules)
        return [x if isinstance(x, Exception) else y if isinstance(y, Exception) else combine(x, y) for x, y in zip(a, b)]

    def _record(self, res: ScheduleResult) -> tuple[dict, list[float]]:
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
            if res.inversion is not None:
                ua["inversion_per_seed"] = [float(v) for v in res.inversion.double()]
        return ua

    def _track(self, number: int, state: str, sched: Schedule | None, params: dict, ua: dict, kind: str) -> None:
        """The trial's MLflow child run, named by what it is (``trial 12 · tpe``, ``trial 3 · baseline uniform``,
        ``trial 90 · polish``) and spanning its evaluation (`_span`)."""
        if self.tracker is None:
            return
        sampler = "compass" if kind == "polish" else self.cfg.sampler
        p = {"kind": kind, "space": "steps" if kind == "polish" else self.cfg.space, "sampler": sampler,
             **{f"p.{k}": round(float(v), 6) for k, v in params.items()}}
        if sched is not None:
            p.update(schedule=sched.name, timesteps=" ".join(map(str, sched.timesteps)))
        metrics = {k: ua.get(k) for k in ("recon", "fid", "inversion", "seconds", "screen_recon", "screen_p")}
        what = {"baseline": f"baseline {sched.name if sched is not None else ''}".strip(), "polish": "polish",
                "gradient": "gradient", "shift": "time shift"}.get(kind, sampler)
        name = f"trial {number} · {what}" + {"PRUNED": " (pruned)", "FAIL": " (failed)"}.get(state, "")
        start_ms, end_ms = self._span.get(number, (None, None))
        self.tracker.log_trial(number, state, p, metrics, name=name, start_ms=start_ms, end_ms=end_ms)

    def _track_progress(self) -> None:
        """The parent run's key numbers so far, stepped by finished trials: the best value and the trial count."""
        if self.tracker is None or self.objective.multi:
            return
        n = finished_count(self.study)
        try:
            best = self.study.best_value
        except ValueError:
            return
        key = f"best_{self.cfg.objective}" if self.cfg.objective.isalnum() else "best_objective"
        self.tracker.log_metrics({key: best, "trials_finished": n}, step=n)

    # -- warm starts --------------------------------------------------------------------------------
    def warm_start(self) -> None:
        have = {t.user_attrs.get("schedule") for t in self.study.get_trials(deepcopy=False)
                if t.user_attrs.get("kind") == "baseline"}
        todo = [b for b in self.cfg.baselines if b not in have]
        dps: dict[str, Schedule] = {}
        if {"dp", "dp_free"} & set(todo):  # a resumed study already has its dp trials
            t0 = time.perf_counter()
            from search.placement.dp import SOLVER_COSTS, dp_schedule, teacher_trajectory

            # Heun's cost takes G^2 / 2 evaluations: a coarser grid keeps it to about a thousand.
            grid = min(self.cfg.dp_grid, HEUN_DP_GRID) if self.cfg.solver in SOLVER_COSTS else self.cfg.dp_grid
            traj = teacher_trajectory(self.model, self.cfg.tuning_seeds[: self.cfg.dp_seeds], self.cfg.teacher_nfe, grid)
            self.log(f"dp teacher trajectory on {len(traj.grid)} grid points: {time.perf_counter() - t0:.1f} s")
            for name in ("dp", "dp_free"):
                if name in todo:
                    t0 = time.perf_counter()  # each placement's own time (both share the trajectory above)
                    dps[name] = dp_schedule(self.model, self.cfg.steps, traj=traj, free_start=name == "dp_free",
                                            solver=self.cfg.solver)
                    self.log(f"{name} placement ({time.perf_counter() - t0:.1f} s): {list(dps[name].timesteps)}")
        if todo:
            self._add_fixed([dps[b] if b in dps else self._baseline(b) for b in todo], "baseline")
        if self.cfg.method == "gradient" and not any(t.user_attrs.get("kind") == "gradient"
                                                     for t in self.study.get_trials(deepcopy=False)):
            sched, extra = self._gradient_placement(self._grad_start(dps))
            self._add_fixed([sched], "gradient", extra)

    def _grad_start(self, dps: dict[str, Schedule]) -> list[int] | None:
        """The gradient placement's starting schedule: None (uniform), or with ``grad_init = "dp"`` the DP
        placement (placed now, or the study's dp warm start on resume)."""
        if self.cfg.grad_init != "dp":
            return None
        if "dp" in dps:
            return list(dps["dp"].timesteps)
        done = [t for t in self.study.get_trials(deepcopy=False)
                if t.user_attrs.get("kind") == "baseline" and t.user_attrs.get("schedule") == "dp"]
        return list(done[0].user_attrs["timesteps"])

    def shift_refine(self) -> None:
        """With ``time_shift``: from the best trial of the search, the steps and a per-step model time shift learned
        together by gradient on the tuning seeds (`search.placement.gradient`, ``time_shift=True``), added as one
        more trial (kind ``shift``, its shift in the user attr `MODEL_SHIFT_KEY`) scored like any other; validation
        then decides whether it is exported. Once per study (a resume that finds it does not redo it)."""
        trials = self.study.get_trials(deepcopy=False)
        if not self.cfg.time_shift or any(t.user_attrs.get("kind") == "shift" for t in trials):
            return
        try:
            bt = self.study.best_trial
        except ValueError:
            self.log("time shift: no complete trial to start from; skipped")
            return
        if self.cfg.objective == "inversion":
            self._inversion_shift(bt)
            return
        sched, extra = self._gradient_placement(list(bt.user_attrs["timesteps"]), time_shift=True)
        shift = sched.meta[MODEL_SHIFT_KEY]
        self.log(f"time shift from trial {bt.number}: model log sigma shift {' '.join(f'{v:+.2f}' for v in shift)}")
        self._add_fixed([Schedule(sched.timesteps, sched.num_train_timesteps, "shift", meta={MODEL_SHIFT_KEY: shift})],
                        "shift", {**extra, MODEL_SHIFT_KEY: shift, "shift_from": bt.number})

    def _inversion_shift(self, bt: optuna.trial.FrozenTrial) -> None:
        """The inversion objective's time shift: the best trial's steps kept, the encoder's and the decoder's model
        time shifts learned on the tuning images' round trip (`search.placement.inversion_shift`; on the actor pools,
        each on its images, when the evaluators are pools), added as a trial of kind ``shift``."""
        from search.placement.inversion_shift import (learn_inversion_shift, local_round_trip_grad_fn,
                                                      pool_round_trip_grad_fn)

        t0 = time.perf_counter()
        steps = Schedule(tuple(bt.user_attrs["timesteps"]), self.model.num_train_timesteps, "shift")
        gc = self.cfg.gradient_config(time_shift=True)
        pools = [ev for ev in (self.screen, self.rest) if ev is not None]
        if all(callable(getattr(ev, "submit_round_trip_gradient", None)) for ev in pools):
            fn = pool_round_trip_grad_fn(pools, steps)
            where = "in process" if all(getattr(ev, "local", False) for ev in pools) else "on the actor pools"
        else:
            import torch

            fn = local_round_trip_grad_fn(self.model, torch.cat([ev.data for ev in pools]), steps)
            where = "in process"

        def on_iter(it: int, loss: float, all_images: bool) -> None:
            if self.tracker is not None:
                self.tracker.log_metrics({"shift_loss" if all_images else "shift_loss_batch": loss}, step=it)

        res = learn_inversion_shift(fn, steps, gc, num_seeds=self.cfg.num_seeds, callback=on_iter,
                                    sides=self.cfg.shift_sides)
        s = res.schedule
        dec = s.meta.get(MODEL_SHIFT_KEY)
        self.log(f"time shift from trial {bt.number} ({gc.iters} iterations, {where}, {time.perf_counter() - t0:.1f} s): "
                 f"tuning round trip {res.losses[0]:.3g} -> {res.losses[res.best_iteration]:.3g}; encoder shift "
                 f"{' '.join(f'{v:+.2f}' for v in s.meta[INVERSE_MODEL_SHIFT_KEY])}, decoder "
                 + (f"shift {' '.join(f'{v:+.2f}' for v in dec)}" if dec is not None else "plain (shift_sides encoder)"))
        shifts = {k: s.meta[k] for k in (MODEL_SHIFT_KEY, INVERSE_MODEL_SHIFT_KEY) if k in s.meta}
        self._add_fixed([Schedule(s.timesteps, s.num_train_timesteps, "shift", meta=shifts)], "shift",
                        {**shifts, "shift_from": bt.number, "gradient_losses": list(res.losses),
                         "gradient_full_iterations": list(res.full_iterations)})

    def _gradient_placement(self, init: list[int] | None = None,
                            time_shift: bool = False) -> tuple[Schedule, dict[str, Any]]:
        """The LD3-style placement on the tuning seeds from `init` (default uniform), its loss per iteration logged
        on the parent run (``gradient_loss``, step = iteration). On the sweep's actor pools (each actor
        differentiates its shard against its resident teacher) when the evaluators are pools, else in this
        process. Returns the schedule and the trial's extra user attrs: the final continuous steps, the loss and
        the continuous steps per iteration (`search.sweep.outputs` writes the latter two as ``gradient_path.json``
        and a plot)."""
        from search.placement.gradient import gradient_placement, local_grad_fn, pool_grad_fn

        t0 = time.perf_counter()
        gc = self.cfg.gradient_config(time_shift)
        pools = [ev for ev in (self.screen, self.rest) if ev is not None]
        if all(callable(getattr(ev, "submit_gradient", None)) for ev in pools):
            # screen seeds then the rest: together the tuning seeds in order (delta's rows)
            fn = pool_grad_fn(pools, solver=self.cfg.solver, loss=gc.loss, time_shift=time_shift)
            where = "in process" if all(getattr(ev, "local", False) for ev in pools) else "on the actor pools"
        else:
            fn = local_grad_fn(self.model, self.cfg.tuning_seeds, self.cfg.teacher_nfe, solver=self.cfg.solver,
                               loss=gc.loss, time_shift=time_shift)
            where = "in process"

        key = "shift_loss" if time_shift else "gradient_loss"

        def on_iter(it: int, loss: float, t_now, all_seeds: bool) -> None:
            # a mini-batch's loss is noisier and not comparable with the all-seed ones: a curve of its own
            if self.tracker is not None:
                self.tracker.log_metrics({key if all_seeds else f"{key}_batch": loss}, step=it)

        res = gradient_placement(fn, self.cfg.steps, self.model.alphas_cumprod, gc, num_seeds=self.cfg.num_seeds,
                                 sample_shape=self.model.sample_shape, init=init, callback=on_iter)
        self.log(f"{'time shift' if time_shift else 'gradient placement'} ({gc.iters} iterations, {where}, {time.perf_counter() - t0:.1f} s): loss "
                 f"{res.losses[0]:.3g} -> {res.losses[-1]:.3g}; {list(res.schedule.timesteps)}")
        return res.schedule, {"continuous_timesteps": list(res.schedule.meta["continuous_timesteps"]),
                              "gradient_losses": list(res.losses), "gradient_path": [list(t) for t in res.timesteps],
                              "gradient_full_iterations": list(res.full_iterations)}

    def _add_fixed(self, scheds: list[Schedule], kind: str, extra: dict[str, Any] | None = None) -> None:
        """Evaluate fixed schedules (warm starts) on all tuning seeds and add each to the study as a trial of `kind`
        (with user attrs `extra` besides the usual)."""
        if self.pinned_top is not None:
            scheds = [with_noisiest_step(s, self.pinned_top) for s in scheds]
        t0 = _now_ms()
        results = self.evaluate_full(scheds)
        span = (t0, _now_ms())  # evaluated together: each warm start's run spans the one call
        dists = self.space.distributions()
        for sched, res in zip(scheds, results):
            params = self.space.params_of(sched)
            exact = self.space.build(params).timesteps == sched.timesteps
            ua: dict[str, Any] = {"kind": kind, "params_exact": exact, **(extra or {})}
            state, values = TrialState.FAIL, None
            try:
                if isinstance(res, Exception):
                    raise TrialFailed(f"{type(res).__name__}: {res}")
                m, values = self._record(res)
                ua.update(self._attrs(sched, m, res))
                state = TrialState.COMPLETE
            except TrialFailed as e:
                ua.update(self._attrs(sched, None, None), error=str(e))
            ft = optuna.trial.create_trial(params=params, distributions=dists, values=values, state=state, user_attrs=ua)
            self.study.add_trial(ft)
            number = self.study.get_trials(deepcopy=False)[-1].number
            self._span[number] = span
            if state == TrialState.COMPLETE:
                self.per_seed[number] = np.asarray(ua[self._per_seed_key])
            self._track(number, state.name, sched, params, ua, kind)

    def _baseline(self, name: str) -> Schedule:
        """A named warm start at the sweep's step count; ``default`` is the solver's diffusers default spacing."""
        if name == "default":
            from pipeline.interop.defaults import default_spacing

            return default_spacing(self.cfg.solver, self.cfg.steps, self.model.alphas_cumprod)
        return make_schedule(name, self.cfg.steps, self.model.alphas_cumprod)

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
        """Ask `k` trials, screen them (when pruning), evaluate the survivors on the rest and tell each."""
        live = self._ask(k)
        t0 = _now_ms()  # a batch is evaluated together: its trials' runs span the calls that carried them
        screen_res: dict[int, ScheduleResult] = {}
        if self.screen is not None and live:
            live, screen_res = self._screen(live, t0)
        rest = safe_evaluate(self.rest, [s for _, s in live])
        t1 = _now_ms()
        self._span.update({trial.number: (t0, t1) for trial, _ in live})
        for (trial, sched), res in zip(live, rest):
            if isinstance(res, Exception):
                self._fail(trial, sched, f"{type(res).__name__}: {res}")
                continue
            self._tell(trial, sched, res, screen_res.get(trial.number))

    def _ask(self, k: int) -> list[tuple[optuna.Trial, Schedule]]:
        """`k` new trials with their schedules; a trial whose params build no valid schedule is told FAIL."""
        live: list[tuple[optuna.Trial, Schedule]] = []
        for trial in [self.study.ask() for _ in range(k)]:
            space = self.polish_space if trial.user_attrs.get("kind") == "polish" else self.space
            try:
                live.append((trial, space.suggest(trial)))
            except (StridelabError, ValueError) as e:
                self._fail(trial, None, f"bad schedule: {e}")
        return live

    def _screen(self, live: list[tuple[optuna.Trial, Schedule]], t0: int
                ) -> tuple[list[tuple[optuna.Trial, Schedule]], dict[int, ScheduleResult]]:
        """Evaluate `live` on the screen seeds and tell PRUNED those worse than the best trial there.

        `t0`: when the batch's evaluation started (ms). Returns the survivors and their screen results by trial number."""
        best = self._best_screen()
        kept, screen_res = [], {}
        results = safe_evaluate(self.screen, [s for _, s in live])
        self._span.update({trial.number: (t0, _now_ms()) for trial, _ in live})
        for (trial, sched), res in zip(live, results):
            if isinstance(res, Exception):
                self._fail(trial, sched, f"{type(res).__name__}: {res}")
                continue
            errs = self.objective.per_seed(res).double().cpu().numpy()
            mean = float(errs.mean())
            if not math.isfinite(mean):
                self._fail(trial, sched, f"non-finite {self.objective.per_seed_metric}")
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
        return kept, screen_res

    def _tell(self, trial: optuna.Trial, sched: Schedule, res: ScheduleResult, screened: ScheduleResult | None) -> None:
        """Tell one evaluated trial COMPLETE (FAIL when its metrics are unusable); `screened`: its screen result."""
        if screened is not None:
            res = combine(screened, res)
        try:
            m, vals = self._record(res)
        except TrialFailed as e:
            self._fail(trial, sched, str(e))
            return
        kind = trial.user_attrs.get("kind", "search")
        ua = {"kind": kind, **self._attrs(sched, m, res)}
        if screened is not None:
            ua["screen_recon"] = float(self.objective.per_seed(screened).double().mean())
        for key, v in ua.items():
            trial.set_user_attr(key, v)
        self.study.tell(trial, vals if self.objective.multi else vals[0])
        self.per_seed[trial.number] = np.asarray(ua[self._per_seed_key])
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
        tried |= {tuple(int(enqueued_params(t)[key]) for key in keys) for t in waiting
                  if set(keys) <= set(enqueued_params(t))}
        step = int(bt.user_attrs.get("polish_step", self.ladder[0]))
        rng = np.random.default_rng([self.cfg.seed, finished_count(self.study)])  # stale trials do not count
        inc = bt.user_attrs["timesteps"]
        parent = trials[bt.user_attrs["polish_from"]] if "polish_from" in bt.user_attrs else None
        move = [a - b for a, b in zip(inc, parent.user_attrs["timesteps"])] if parent is not None else None
        for ts, s in next_candidates(inc, step, tried, need, self.model.num_train_timesteps, self.ladder, rng, move,
                                        self.pinned_top):
            self.study.enqueue_trial(dict(zip(keys, ts)),
                                     user_attrs={"kind": "polish", "polish_step": s, "polish_from": bt.number})

    def _reseed(self, source_trials: list | None) -> None:
        """Give the study a fresh sampler seeded from (seed, trials counted so far) before a batch.

        A sampler's RNG lives in this process, not in the storage: seeded once, a resumed sweep would ask
        other trials than an undisturbed one. Seeded per batch from the study's own count, what a batch
        asks depends only on the study's history (stale trials of a killed driver are not counted).
        """
        seed = int(np.random.SeedSequence([self.cfg.seed, finished_count(self.study)]).generate_state(1)[0])
        self.study.sampler = make_sampler(self.cfg.sampler, seed, multi_objective=self.objective.multi,
                                          source_trials=source_trials)

    def search(self) -> None:
        # CMA-ES starts from the warm starts (WS-CMA-ES) instead of the middle of the box.
        src = None
        if self.cfg.sampler == "cmaes":
            src = [t for t in self.study.get_trials(states=(TrialState.COMPLETE,)) if t.user_attrs.get("kind") == "baseline"]
        note = self.cfg.budget_note()
        if note and finished_count(self.study) < self.cfg.trials:
            self.log(note)
        t0, start = time.perf_counter(), finished_count(self.study)
        global_end = self.cfg.trials - self.cfg.polish_trials
        bar = progress(self.cfg.trials, "trials", unit="trial", initial=start)
        waiting = self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if waiting and start < self.cfg.trials:
            # A stopped driver's batch, enqueued again on resume: run it alone, as the undisturbed run did.
            self.run_batch(min(len(waiting), self.cfg.trials - start))
            bar.update(finished_count(self.study) - start)
        while (done := finished_count(self.study)) < self.cfg.trials:
            if done < global_end:
                self._reseed(src)
                self.run_batch(min(self.cfg.parallel, global_end - done))
            else:
                k = min(self.cfg.parallel, self.cfg.trials - done)
                self.enqueue_polish(k)
                self.run_batch(k)
            n = finished_count(self.study)
            bar.update(n - done)
            self._track_progress()
            if self.objective.multi:
                best = f"Pareto front {len(self.study.best_trials)}"
            else:
                try:
                    best = f"best {self.study.best_value:.4g}"
                except ValueError:
                    best = "no complete trial yet"
            self.log(f"  trials {n}/{self.cfg.trials}  {best}  ({time.perf_counter() - t0:.0f} s)")
        bar.close()
        if finished_count(self.study) > start:
            self.log(f"search: {finished_count(self.study) - start} trials in {time.perf_counter() - t0:.1f} s")

