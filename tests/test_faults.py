"""Faults a sweep must survive, on a real local Ray and real storage (Optuna journal file, sqlite MLflow):

1. a sampler actor SIGKILLed in the middle of a trial: Ray restarts it and retries the task; the sweep
   finishes with exactly the requested trials and the same numbers as a sweep nobody disturbed;
2. the sweep driver, holding 2 Ray actors, SIGKILLed inside a batch, then ``--resume``: exactly the
   requested trials, none twice, the trials finished before the kill kept and equal to an undisturbed run's,
   no MLflow run left RUNNING, and at most one child run lost (the trial told just before the kill);
3. a model that returns NaN for some schedules: those trials are FAIL (with the reason), the others
   COMPLETE, and the sweep finishes.

Budgets are tiny (gmm:ring8, NFE 5, <= 40 trials, 16-32 seeds): the whole file runs in about a minute
and a half on 2 busy cores.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from pipeline.models.load import load_model
from search.study import finished_count, make_storage
from search.sweep import SweepConfig, run_sweep

from pipeline.distributed import SamplerPool

ROOT = Path(__file__).resolve().parents[1]
NAN_BELOW = 100
"""The NaN model breaks down at every timestep 0 < t < NAN_BELOW."""


@pytest.fixture(scope="module", autouse=True)
def picklable_here():
    """Ray actors unpickle the loaders below by value (this test module is not importable on workers)."""
    import ray.cloudpickle as cp

    cp.register_pickle_by_value(sys.modules[__name__])
    yield
    cp.unregister_pickle_by_value(sys.modules[__name__])


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


# --------------------------------------------------------------------------------------------------
# Models with a fault built in, loaded by the pool's actors through `SamplerPool(loader=...)`


class SlowDenoiser(torch.nn.Module):
    """The wrapped denoiser, 50 ms slower per call: a trial lasts long enough to be killed inside."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        time.sleep(0.05)
        return self.inner(x, t)


class NaNDenoiser(torch.nn.Module):
    """eps = NaN at every timestep 0 < t < NAN_BELOW (a model that breaks down near the data end)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = self.inner(x, t)
        bad = ((t > 0) & (t < NAN_BELOW)).view(-1, *([1] * (eps.dim() - 1)))
        return torch.where(bad, torch.full_like(eps, float("nan")), eps)


def slow_loader(spec, device, dtype):
    m = load_model(spec, device, dtype)
    return dataclasses.replace(m, denoiser=SlowDenoiser(m.denoiser))


def nan_loader(spec, device, dtype):
    m = load_model(spec, device, dtype)
    return dataclasses.replace(m, denoiser=NaNDenoiser(m.denoiser))


def breaks(timesteps) -> bool:
    return any(0 < t < NAN_BELOW for t in timesteps)


def study_of(storage, name: str = "s") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=make_storage(storage))


# --------------------------------------------------------------------------------------------------
# 1. a sampler actor killed during a sweep

SMALL = dict(model="gmm:ring8", nfe=5, trials=8, parallel=2, num_seeds=16, holdout_seeds=8, teacher_nfe=50,
             baselines=("uniform", "quadratic"), prune=False, holdout_fid=False,
             validation_seeds=0)  # the pools here hold their actors to the end: a third would not fit on 2 CPUs


class KillOnSecondCall:
    """An evaluator around a real `SamplerPool`: on its 2nd ``evaluate`` it submits the batch, waits until
    an actor has started a task (trace markers), SIGKILLs that actor's process, then collects the results."""

    def __init__(self, pool: SamplerPool, trace_dir: Path, state: dict):
        self.pool, self.trace_dir, self.state, self.calls = pool, trace_dir, state, 0

    def evaluate(self, schedules):
        self.calls += 1
        if self.calls != 2 or self.state.get("killed"):
            return self.pool.evaluate(schedules)
        pids = self.pool.pids()
        seen = set(os.listdir(self.trace_dir))
        pending = self.pool.submit(schedules)
        deadline = time.monotonic() + 60
        while True:
            started = [f for f in set(os.listdir(self.trace_dir)) - seen if f.endswith(".evaluate.start")]
            running = [f for f in started if f[: -len("start")] + "done" not in os.listdir(self.trace_dir)]
            if running:
                victim = int(running[0].split(".")[0])
                break
            assert time.monotonic() < deadline, "no actor started the batch"
            time.sleep(0.005)
        assert victim in pids
        os.kill(victim, signal.SIGKILL)
        self.state.update(killed=victim, pids_before=pids)
        out = pending.result()  # Ray restarts the actor and retries its tasks
        self.state["pids_after"] = self.pool.pids()
        return out


def test_actor_killed_mid_trial_sweep_completes_with_the_same_trials(ray_local, tmp_path):
    cfg = SweepConfig(**SMALL)
    model = load_model(cfg.model)
    trace, state, pools = tmp_path / "trace", {}, []
    trace.mkdir()

    def evaluators(seeds):
        pool = SamplerPool(cfg.model, seeds, cfg.teacher_nfe, actors=2, num_cpus=0.4, loader=slow_loader,
                           trace_dir=trace)
        pools.append(pool)
        return KillOnSecondCall(pool, trace, state)

    try:
        res = run_sweep(cfg, study_name="killed", out_dir=tmp_path, model=model, evaluators=evaluators,
                        track=False, figures=False, log=lambda *_: None)
    finally:
        for p in pools:
            p.close()
    assert state.get("killed"), "no actor was killed"
    assert state["killed"] not in state["pids_after"] and len(state["pids_after"]) == 2  # restarted
    assert len(set(state["pids_after"]) & set(state["pids_before"])) == 1  # the other one untouched

    # An undisturbed in-process sweep of the same config: the same trials, the same numbers.
    ref = run_sweep(cfg, study_name="clean", out_dir=tmp_path, model=model, actors=0, track=False, figures=False,
                    log=lambda *_: None)
    killed, clean = study_of(tmp_path / "optuna.journal", "killed"), study_of(tmp_path / "optuna.journal", "clean")
    assert finished_count(killed) == len(killed.trials) == cfg.trials
    assert [t.state for t in killed.trials] == [t.state for t in clean.trials]
    assert [t.user_attrs.get("timesteps") for t in killed.trials] == [t.user_attrs.get("timesteps") for t in clean.trials]
    assert [t.values for t in killed.trials] == [t.values for t in clean.trials]
    # The injected pools serve the sweep's solver only, so the clean run's reference rows (other solvers'
    # defaults, made by the factory) have no counterpart here: compare the sweep's own rows.
    own = lambda rows: [r["holdout_recon"] for r in rows if r.get("solver", "ddim") == cfg.solver]  # noqa: E731
    assert own(res.rows) == own(ref.rows) and len(own(res.rows)) == len(res.rows)


# --------------------------------------------------------------------------------------------------
# 2. the sweep driver, holding 2 Ray actors, killed mid-run, then --resume; compared with an undisturbed run

TRIALS = 30


def sweep_cmd(tmp: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", "sweep", "--model", "gmm:ring8", "--nfe", "5", "--trials", str(TRIALS),
            "--parallel", "2", "--num-seeds", "32", "--holdout-seeds", "8", "--teacher-nfe", "50",
            "--schedules", "uniform,quadratic,karras", "--storage", str(tmp / "optuna.journal"),
            "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--study-name", "s", "--out-dir", str(tmp / "out"),
            "--actors", "2", "--no-holdout-fid", *extra]


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL what is left of the process group this test started (the killed driver's local Ray)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """An undisturbed sweep, and the same command SIGKILLed inside a batch and resumed (own Ray each)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
    clean, tmp = tmp_path_factory.mktemp("clean"), tmp_path_factory.mktemp("killed")
    r = subprocess.run(sweep_cmd(clean), cwd=clean, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]

    log = (tmp / "first.log").open("w")
    proc = subprocess.Popen(sweep_cmd(tmp), cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    journal = tmp / "optuna.journal"
    try:
        deadline = time.monotonic() + 400
        while proc.poll() is None and time.monotonic() < deadline:
            if journal.exists():
                try:
                    trials = study_of(journal).get_trials(deepcopy=False)
                except KeyError:  # study not created yet
                    trials = []
                # Kill inside a batch: some trials finished, at least one asked and still on the actors.
                if sum(t.state.is_finished() for t in trials) >= 6 and any(t.state == TrialState.RUNNING for t in trials):
                    os.kill(proc.pid, signal.SIGKILL)
                    break
            time.sleep(0.02)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        _kill_group(proc)
        log.close()
    assert rc == -signal.SIGKILL, (tmp / "first.log").read_text()[-2000:]
    before = [t for t in study_of(journal).trials if t.state.is_finished()]
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name("stridelab-sweep")
    dead = [x.info.status for x in client.search_runs([exp.experiment_id], "tags.`stridelab.kind` = 'sweep'")]
    resumed = subprocess.run(sweep_cmd(tmp, "--resume"), cwd=tmp, env=env, capture_output=True, text=True,
                             timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    return dict(clean=clean, tmp=tmp, before=before, dead=dead, resumed=resumed)


def _counted(study: optuna.Study) -> list:
    return [t for t in study.trials if not t.user_attrs.get("stale")]


def test_driver_with_actors_sigkilled_then_resumed_exact_trials_and_mlflow_runs(killed_and_resumed):
    from mlflow import MlflowClient

    k = killed_and_resumed
    tmp, before, r = k["tmp"], k["before"], k["resumed"]
    assert 6 <= len(before) < TRIALS
    assert k["dead"] == ["RUNNING"]  # the killed driver's parent run, never ended
    study, clean = study_of(tmp / "optuna.journal"), study_of(k["clean"] / "optuna.journal")
    trials = study.trials
    # Exactly TRIALS counted trials; the one(s) killed on the actors are FAIL + stale, not counted.
    assert finished_count(study) == TRIALS == finished_count(clean) == len(clean.trials)
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    stale = [t for t in trials if t.user_attrs.get("stale")]
    assert stale and all(t.state == TrialState.FAIL for t in stale)
    assert len(trials) == TRIALS + len(stale)
    warm = [t.user_attrs["schedule"] for t in trials if t.user_attrs.get("kind") == "baseline"]
    assert sorted(warm) == ["karras", "quadratic", "uniform"]
    counted_ts = [tuple(t.user_attrs["timesteps"]) for t in trials
                  if t.state.is_finished() and not t.user_attrs.get("stale") and "timesteps" in t.user_attrs]
    assert len(counted_ts) >= TRIALS - 2 and len(set(counted_ts)) == len(counted_ts)  # no schedule evaluated twice
    # What finished before the kill is kept, and is what the undisturbed run has for the same trials.
    for t in before:
        ref = clean.trials[t.number]
        assert (trials[t.number].state, trials[t.number].values, trials[t.number].params) == (t.state, t.values, t.params)
        assert (t.state, t.values, t.params, t.user_attrs.get("timesteps")) == (
            ref.state, ref.values, ref.params, ref.user_attrs.get("timesteps"))
    # The held-out rows of the warm starts equal the undisturbed run's, number for number.
    rows = {n: [x for x in _read_csv(d / "out" / "s" / "comparison.csv") if not x["schedule"].startswith("learned")]
            for n, d in (("killed", tmp), ("clean", k["clean"]))}
    assert len(rows["clean"]) >= 3 and rows["killed"] == rows["clean"]

    # MLflow: nothing RUNNING; one parent, the dead driver's, continued by the resumed one (segment 2) and
    # FINISHED, its story saying the first driver stopped without ending it; one child per
    # counted trial, except that a kill between Optuna's tell and MLflow's log loses that one trial's child:
    # at most one, and only the trial told last before the kill.
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name("stridelab-sweep")
    runs = client.search_runs([exp.experiment_id], "", max_results=1000)
    assert [x.info.run_id for x in runs if x.info.status == "RUNNING"] == []
    parents = {x.info.run_id: x for x in runs if x.data.tags.get("stridelab.kind") == "sweep"}
    assert [x.info.status for x in parents.values()] == ["FINISHED"]
    (parent,) = parents.values()
    assert parent.data.tags["segments"] == "2" and "stopped without ending" in parent.data.tags["mlflow.note.content"]
    assert set(study.user_attrs["mlflow_parent_runs"]) == set(parents)
    kids = [x for x in runs if x.data.tags.get("mlflow.parentRunId") in parents]
    numbers = [int(x.data.tags["trial"]) for x in kids]
    assert len(numbers) == len(set(numbers)), "a trial was logged twice"
    counted = {t.number: t for t in trials if not t.user_attrs.get("stale")}
    assert set(numbers) <= set(counted)
    last_told = max(before, key=lambda t: t.datetime_complete).number
    assert set(counted) - set(numbers) <= {last_told}
    for x in kids:
        assert x.data.tags["state"] == counted[int(x.data.tags["trial"])].state.name
    assert "resume: trials" in r.stdout and "marked FAIL" in r.stdout


def test_resumed_study_equals_the_undisturbed_one(killed_and_resumed):
    """The sampler is reseeded from the study's trial count before every batch (search/sweep/loop.py), so the
    trials asked after --resume are the undisturbed run's, schedule for schedule and value for value."""
    k = killed_and_resumed
    got, ref = _counted(study_of(k["tmp"] / "optuna.journal")), _counted(study_of(k["clean"] / "optuna.journal"))
    assert [t.user_attrs.get("timesteps") for t in got] == [t.user_attrs.get("timesteps") for t in ref]
    assert [t.values for t in got] == [t.values for t in ref]


def _read_csv(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------------------
# 3. a model that returns NaN for some schedules


def test_nan_model_trials_fail_and_the_sweep_goes_on(ray_local, tmp_path):
    # Teacher: uniform 10 steps (900, ..., 100, 0), which never visits 0 < t < 100.
    cfg = SweepConfig(model="gmm:ring8", nfe=5, trials=12, parallel=3, num_seeds=16, holdout_seeds=8, teacher_nfe=10,
                      baselines=("uniform", "karras", "quadratic", "logsnr"), prune=False, holdout_fid=False)
    pools: list[SamplerPool] = []

    def evaluators(seeds):
        pools.append(SamplerPool(cfg.model, seeds, cfg.teacher_nfe, actors=1, num_cpus=0.4, loader=nan_loader))
        return pools[-1]

    try:
        res = run_sweep(cfg, study_name="nan", out_dir=tmp_path, model=nan_loader(cfg.model, "cpu", torch.float32),
                        evaluators=evaluators, track=True, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                        figures=False, log=lambda *_: None)
    finally:
        for p in pools:
            p.close()
    study = study_of(tmp_path / "optuna.journal", "nan")
    trials = study.trials
    assert len(trials) == finished_count(study) == cfg.trials
    failed = [t for t in trials if t.state == TrialState.FAIL]
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert failed and done
    # Exactly the schedules that visit the broken timesteps failed, each with its reason.
    assert all(breaks(t.user_attrs["timesteps"]) for t in failed)
    assert all(not breaks(t.user_attrs["timesteps"]) for t in done)
    assert all("non-finite" in t.user_attrs["error"] for t in failed)
    warm = {t.user_attrs["schedule"]: t.state for t in trials if t.user_attrs.get("kind") == "baseline"}
    assert warm == {"uniform": TrialState.COMPLETE, "karras": TrialState.COMPLETE,
                    "quadratic": TrialState.FAIL, "logsnr": TrialState.FAIL}
    # The sweep finished: a finite best schedule, the held-out table, a FINISHED MLflow run with FAIL children.
    assert not breaks(res.best.timesteps) and res.rows[0]["holdout_recon"] > 0
    from mlflow import MlflowClient

    c = MlflowClient(res.tracking_uri)
    assert c.get_run(res.parent_run_id).info.status == "FINISHED"
    kids = c.search_runs([c.get_run(res.parent_run_id).info.experiment_id],
                         f"tags.mlflow.parentRunId = '{res.parent_run_id}'")
    assert sorted(k.data.tags["state"] for k in kids) == sorted(t.state.name for t in trials)
    assert {k.info.status for k in kids if k.data.tags["state"] == "FAIL"} == {"FAILED"}
