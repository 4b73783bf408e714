"""The sweep end to end on gmm:ring8: warm starts in the study, exact trial counts on resume, failing
trials recorded FAIL, FID objectives through a stand-in evaluator, MLflow runs, CLI errors."""

from __future__ import annotations

import math

import optuna
import pyarrow.parquet as pq
import pytest
import torch
from optuna.trial import TrialState

from pipeline.core.schedules import Schedule
from pipeline.errors import StridelabError
from pipeline.evaluation.inprocess import InProcessEvaluator, ScheduleResult
from pipeline.models.load import load_model
from search.study import finished_count, make_storage
from search.sweep import SweepConfig, run_sweep

TEACHER_NFE = 100
BASELINES = ("uniform", "quadratic", "karras", "logsnr", "dp")


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


@pytest.fixture(scope="module")
def ring8():
    return load_model("gmm:ring8")


@pytest.fixture(scope="module")
def evaluators(ring8):
    """seeds -> InProcessEvaluator, cached: every sweep of this module pays for each teacher once."""
    cache: dict[tuple[int, ...], InProcessEvaluator] = {}

    def make(seeds):
        key = tuple(seeds)
        if key not in cache:
            cache[key] = InProcessEvaluator(ring8, key, teacher_nfe=TEACHER_NFE)
        return cache[key]

    return make


def cfg(**kw):
    base = dict(model="gmm:ring8", nfe=10, trials=14, parallel=3, num_seeds=24, holdout_seeds=32, seed=0,
                baselines=BASELINES, teacher_nfe=TEACHER_NFE, dp_seeds=16, dp_grid=40, grid_seeds=16, polish=4,
                validation_seeds=0)  # these tests pin the study's best trial as the export (tests/test_sweep_trust.py validates)
    return SweepConfig(**{**base, **kw})


def sweep(tmp_path, ring8, evaluators, name="s", track=False, resume=False, figures=False, **kw):
    return run_sweep(cfg(**kw), study_name=name, out_dir=tmp_path / "out", model=ring8, evaluators=evaluators,
                     track=track, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}" if track else None,
                     resume=resume, figures=figures, log=lambda *_: None)


def load(tmp_path, name="s"):
    return optuna.load_study(study_name=name, storage=make_storage(tmp_path / "out" / "optuna.journal"))


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, ring8, evaluators):
    tmp = tmp_path_factory.mktemp("tracked")
    res = sweep(tmp, ring8, evaluators, track=True, figures=True)
    return tmp, res


def test_baselines_are_trials_and_the_best_is_never_worse(tracked):
    tmp, res = tracked
    study = load(tmp)
    warm = {t.user_attrs["schedule"]: t for t in study.trials if t.user_attrs.get("kind") == "baseline"}
    assert set(warm) == set(BASELINES)
    assert all(t.state == TrialState.COMPLETE for t in warm.values())
    assert finished_count(study) == 14
    # the table's learned row is the best finished trial, found here by scanning every trial (not Optuna's
    # best_trial), and its tuning recon is at most every baseline row's
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert res.rows[0]["tuning_recon"] == min(t.user_attrs["recon"] for t in done)
    assert all(res.rows[0]["tuning_recon"] <= r["tuning_recon"] for r in res.rows[1:])
    # the exported schedule is the best trial's, and the table compares it with every warm start
    assert list(res.best.timesteps) == study.best_trial.user_attrs["timesteps"]
    assert [r["schedule"] for r in res.rows][0].startswith("learned")
    assert {r["schedule"] for r in res.rows[1:]} == set(BASELINES)
    assert all(r["holdout_recon"] > 0 for r in res.rows)


def test_outputs_and_parquet_table(tracked):
    tmp, res = tracked
    for f in ("best_schedule.json", "comparison.csv", "trials.parquet", "steps.png", "history.png", "samples.png"):
        assert (res.out_dir / f).is_file(), f
    assert not (res.out_dir / "holdout.png").exists()  # no FID in this table: no recon-vs-FID plot
    t = pq.read_table(res.out_dir / "trials.parquet").to_pylist()
    assert len(t) == 14 and {r["state"] for r in t} <= {"COMPLETE", "PRUNED", "FAIL"}
    assert all(len(r["timesteps"]) == 10 for r in t)


def test_mlflow_parent_and_child_runs(tracked):
    from mlflow import MlflowClient

    tmp, res = tracked
    c = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    parent = c.get_run(res.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.params["nfe"] == "10"
    assert "holdout_recon" in parent.data.metrics
    kids = c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{res.parent_run_id}'", max_results=100)
    assert len(kids) == 14
    done = [k for k in kids if k.data.tags["state"] == "COMPLETE"]
    assert done and all("recon" in k.data.metrics and len(k.data.params["timesteps"].split()) == 10 for k in done)
    arts = {a.path for a in c.list_artifacts(res.parent_run_id)}
    assert {"best_schedule.json", "steps.png", "samples.png", "history.png", "comparison.csv", "trials.parquet"} <= arts


def test_resume_gives_exactly_n_trials(tmp_path, ring8, evaluators):
    sweep(tmp_path, ring8, evaluators, trials=9)
    study = load(tmp_path)
    assert finished_count(study) == 9
    stale = study.ask()  # a driver killed mid-trial leaves this RUNNING
    with pytest.raises(ValueError, match="already exists"):
        sweep(tmp_path, ring8, evaluators, trials=15)
    sweep(tmp_path, ring8, evaluators, trials=15, resume=True)
    study = load(tmp_path)
    assert finished_count(study) == 15
    t = study.trials[stale.number]
    assert t.state == TrialState.FAIL and t.user_attrs["stale"] is True
    assert sum(t.user_attrs.get("kind") == "baseline" for t in study.trials) == len(BASELINES)  # not re-added
    with pytest.raises(ValueError, match="other settings"):
        sweep(tmp_path, ring8, evaluators, trials=16, resume=True, nfe=5)


class Flaky:
    """Wraps an evaluator: a schedule whose next-to-last timestep is a multiple of 7 gets a NaN recon, and batches
    holding a schedule whose first timestep is odd raise (the sweep then retries one by one, so only that
    schedule fails). Which trials fail follows from their schedules alone, not from how they were batched."""

    def __init__(self, inner):
        self.inner = inner

    @staticmethod
    def fails(timesteps) -> bool:
        return timesteps[0] % 2 == 1 or timesteps[-2] % 7 == 0

    def evaluate(self, schedules):
        if len(schedules) > 1 and any(s.timesteps[0] % 2 for s in schedules):
            raise RuntimeError("actor died")
        if len(schedules) == 1 and schedules[0].timesteps[0] % 2:
            raise RuntimeError("bad schedule")
        out = []
        for r in self.inner.evaluate(schedules):
            if r.schedule.timesteps[-2] % 7 == 0:
                r = ScheduleResult(r.schedule, torch.full_like(r.recon, math.nan), r.inversion, r.seconds, r.extra)
            out.append(r)
        return out


def test_failing_trials_are_fail_and_the_sweep_goes_on(tmp_path, ring8, evaluators):
    flaky: dict = {}

    def make(seeds):
        return flaky.setdefault(tuple(seeds), Flaky(evaluators(seeds)))

    res = sweep(tmp_path, ring8, make, trials=16, prune=False, baselines=("uniform", "karras", "dp"))
    study = load(tmp_path)
    trials = study.trials
    assert len(trials) == finished_count(study) == 16
    assert all(t.state in (TrialState.FAIL, TrialState.COMPLETE) for t in trials)
    # Exactly the trials whose own schedule is bad fail: a bad schedule never takes its batch-mates with it.
    failed = {t.number for t in trials if t.state == TrialState.FAIL}
    assert failed == {t.number for t in trials if Flaky.fails(t.user_attrs["timesteps"])}
    assert 2 <= len(failed) <= 16 - 3
    # The warm starts are one batch: karras (999 ...) raises inside it; uniform and dp still complete.
    warm = {t.user_attrs["schedule"]: t.state for t in trials if t.user_attrs.get("kind") == "baseline"}
    assert warm == {"uniform": TrialState.COMPLETE, "karras": TrialState.FAIL, "dp": TrialState.COMPLETE}
    assert all("error" in t.user_attrs for t in trials if t.state == TrialState.FAIL)
    # A completed batch-mate of a failed trial keeps its own value: what the undisturbed evaluator gives it.
    seeds = next(iter(flaky))  # the tuning seeds (prune=False: no screen); the held-out set comes after
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    alone = evaluators(seeds).evaluate([Schedule(tuple(t.user_attrs["timesteps"])) for t in done])
    assert [t.user_attrs["recon_per_seed"] for t in done] == [[float(v) for v in r.recon.double()] for r in alone]
    assert res.best.nfe == 10


class WithFid:
    """Stand-in for an evaluator that computes FID: extra["fid"] from the samples' spread (deterministic)."""

    def __init__(self, inner):
        self.inner = inner

    def evaluate(self, schedules):
        out = []
        for r in self.inner.evaluate(schedules):
            fid = 1.0 + 50 * r.recon.mean().item() ** 0.5 + 0.01 * (r.schedule.timesteps[0] / 1000)
            out.append(ScheduleResult(r.schedule, r.recon, r.inversion, r.seconds, {"fid": fid}))
        return out


def test_objective_values():
    from search.evaluators import Objective, TrialFailed

    m = {"recon": 1e-3, "fid": 4.0}
    assert Objective("recon").values(m) == [1e-3] and Objective("fid").values(m) == [4.0]
    assert Objective("recon,fid").values(m) == [1e-3, 4.0]
    assert Objective("recon+fid", 0.5).values(m)[0] == pytest.approx(math.log(1e-3) + 0.5 * math.log(4.0))
    r = ScheduleResult(None, torch.tensor([1.0, math.nan]))
    with pytest.raises(TrialFailed):
        Objective("recon").metrics(r)
    with pytest.raises(ValueError, match="needs FID"):
        Objective("fid").metrics(ScheduleResult(None, torch.tensor([1.0])))


@pytest.mark.parametrize("objective,sampler", [("fid", "tpe"), ("recon,fid", "nsga2")])
def test_fid_objectives(tmp_path, ring8, evaluators, objective, sampler):
    res = sweep(tmp_path, ring8, lambda seeds: WithFid(evaluators(seeds)), trials=8, objective=objective,
                sampler=sampler, baselines=("uniform", "quadratic", "dp"), figures=objective == "recon,fid")
    study = load(tmp_path)
    assert len(study.directions) == (2 if objective == "recon,fid" else 1)
    assert finished_count(study) == 8
    assert all("fid" in t.user_attrs for t in study.trials if t.state == TrialState.COMPLETE)
    assert "holdout_fid" in res.rows[0]
    if objective == "recon,fid":
        assert study.best_trials and (res.out_dir / "history.png").is_file()


@pytest.mark.parametrize("sampler", ["gp", "cmaes"])
def test_other_samplers_run(tmp_path, ring8, evaluators, sampler):
    sweep(tmp_path, ring8, evaluators, trials=6, sampler=sampler, parallel=2, baselines=("uniform", "dp"), polish=0)
    study = load(tmp_path)
    assert finished_count(study) == 6
    assert {t.user_attrs["kind"] for t in study.trials} == {"baseline", "search"}


def _moved_by(a, b):
    """(number of coordinates that differ, the set of absolute differences) between two timestep lists."""
    d = [abs(x - y) for x, y in zip(a, b) if x != y]
    return len(d), set(d)


def test_polish_phase_moves_one_step_of_the_incumbent(tracked):
    tmp, res = tracked
    study = load(tmp)
    assert len(study.trials) == 14  # nothing left WAITING: each batch enqueues only what it asks
    kinds = [t.user_attrs["kind"] for t in study.trials]
    assert kinds.count("polish") == 4 and kinds[-4:] == ["polish"] * 4  # the last --polish trials
    by_number = {t.number: t for t in study.trials}
    for t in study.trials[-4:]:
        src = by_number[t.user_attrs["polish_from"]]
        assert src.state == TrialState.COMPLETE and src.number < t.number
        n_moved, sizes = _moved_by(t.user_attrs["timesteps"], src.user_attrs["timesteps"])
        assert n_moved == 1 and sizes == {t.user_attrs["polish_step"]}
        assert [t.params[f"t{i:02d}"] for i in range(10)] == t.user_attrs["timesteps"]
    # every trial of the study evaluated a different schedule: polish never repeats one
    ts = [tuple(t.user_attrs["timesteps"]) for t in study.trials]
    assert len(set(ts)) == len(ts)
    # the incumbent the first polish batch started from is the best of the global phase
    global_best = min((t for t in study.trials[:-4] if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert study.trials[-4].user_attrs["polish_from"] == global_best.number
    # every polish move starts from the incumbent when it was enqueued: the best trial finished before the
    # first polish trial that names the same source
    polish = [t for t in study.trials if t.user_attrs["kind"] == "polish"]
    for t in polish:
        first = min(p.number for p in polish if p.user_attrs["polish_from"] == t.user_attrs["polish_from"])
        before = [p.value for p in study.trials[:first] if p.state == TrialState.COMPLETE]
        assert by_number[t.user_attrs["polish_from"]].value == min(before), t.number


def test_polish_resumes_enqueued_moves_and_counts_exactly(tmp_path, ring8, evaluators):
    sweep(tmp_path, ring8, evaluators, trials=12, polish=6)
    study = load(tmp_path)
    # a driver stopped between enqueueing a polish batch and asking it leaves WAITING trials behind
    best = study.best_trial
    moved = list(best.user_attrs["timesteps"])
    moved[-1] += 3 if moved[-1] + 3 < moved[-2] else -1
    study.enqueue_trial({f"t{i:02d}": v for i, v in enumerate(moved)},
                        user_attrs={"kind": "polish", "polish_step": 5, "polish_from": best.number})
    sweep(tmp_path, ring8, evaluators, trials=16, polish=6, resume=True)
    study = load(tmp_path)
    assert finished_count(study) == 16 and not [t for t in study.trials if t.state == TrialState.WAITING]
    picked = [t for t in study.trials if t.user_attrs.get("timesteps") == moved]
    assert len(picked) == 1 and picked[0].user_attrs["kind"] == "polish"
    ts = [tuple(t.user_attrs["timesteps"]) for t in study.trials]
    assert len(set(ts)) == len(ts)


def test_dp_free_is_an_optional_warm_start(tmp_path, ring8, evaluators):
    sweep(tmp_path, ring8, evaluators, trials=8, polish=0, baselines=("uniform", "dp", "dp_free"))
    warm = {t.user_attrs["schedule"]: t for t in load(tmp_path).trials if t.user_attrs.get("kind") == "baseline"}
    assert set(warm) == {"uniform", "dp", "dp_free"}
    # the fixed-start DP starts where x_T lives: the teacher's first timestep (leading, 100 steps: 990)
    assert warm["dp"].user_attrs["timesteps"][0] == (1000 // TEACHER_NFE) * (TEACHER_NFE - 1)
    assert "dp_free" not in cfg().baselines  # opt-in: the default sweep's figures do not depend on it


def test_polish_is_off_for_two_objectives():
    assert cfg(objective="recon,fid", sampler="nsga2", polish=4).polish_trials == 0
    assert cfg(polish=100).polish_trials == (14 - len(BASELINES)) * 2 // 3  # capped (tests/test_sweep_trust.py)
    assert cfg(polish=4).polish_trials == 4


def test_automatic_screen_always_leaves_rest_seeds():
    """screen_seeds = 0 (the default) sizes the screen from num_seeds but never takes every tuning seed."""
    assert SweepConfig().n_screen == 64  # the default sweep: 256 // 4, unchanged
    assert cfg(num_seeds=24).n_screen == 8
    assert cfg(num_seeds=8).n_screen == 7 and cfg(num_seeds=8, screen_seeds=0).n_screen == 7
    assert cfg(num_seeds=2).n_screen == 1
    assert cfg(num_seeds=8, screen_seeds=3).n_screen == 3


@pytest.mark.parametrize("screen_seeds", [8, 9, -1])
def test_explicit_screen_must_leave_rest_seeds(screen_seeds):
    with pytest.raises(StridelabError, match="`screen_seeds` must be in \\[0, 8\\)"):
        cfg(num_seeds=8, screen_seeds=screen_seeds)


def test_small_seed_sets_prune_without_an_empty_stage(tmp_path, ring8, evaluators):
    """The crash of `--num-seeds 8` (the screen took all 8 seeds, the rest stage got none) is gone."""
    asked: list[tuple[int, ...]] = []

    def recording(seeds):
        asked.append(tuple(seeds))
        return evaluators(seeds)

    res = run_sweep(cfg(nfe=5, trials=8, num_seeds=8, holdout_seeds=4, polish=2), study_name="small",
                    out_dir=tmp_path / "out", model=ring8, evaluators=recording, track=False, figures=False,
                    log=lambda *_: None)
    assert asked[:2] == [tuple(range(7)), (7,)] and all(asked)
    assert sum(res.counts.values()) == 8 and res.rows[0]["schedule"].startswith("learned")


@pytest.mark.parametrize("argv,needle", [
    (["--nfe", "0"], "--nfe"),
    (["--optuna-sampler", "sgd"], "unknown sampler"),
    (["--space", "spline"], "unknown search space"),
    (["--objective", "lpips"], "unknown objective"),
    (["--trials", "3"], "--trials"),
    (["--schedules", "uniform,nope"], "unknown baseline"),
    (["--polish", "-1"], "--polish"),
    (["--actors", "-1"], "--actors"),
])
def test_bad_flags_one_line_exit_2(cli_stderr, tmp_path, argv, needle):
    from jobs.cli import main

    rc = main(["sweep", "--model", "gmm:ring8", "--out-dir", str(tmp_path), "--no-mlflow", *argv])
    err = cli_stderr()
    assert rc == 2 and len(err) == 1 and needle in err[0], err


def test_holdout_plot_skips_rows_it_cannot_place(tmp_path):
    from PIL import Image

    from search.plots import holdout_plot

    rows = [{"schedule": "learned", "holdout_recon": 1.4e-3, "holdout_fid": 3.4},
            {"schedule": "uniform", "holdout_recon": 2.3e-3, "holdout_fid": 3.6},
            {"schedule": "karras", "holdout_recon": float("nan"), "holdout_fid": 7.0},  # NaN: left out
            {"schedule": "dp", "error": "boom"},                                         # failed row: left out
            {"schedule": "teacher (250-step DDIM)", "holdout_recon": 0.0, "holdout_fid": 2.1}]  # the floor line
    path = holdout_plot(rows, tmp_path / "h.png")
    assert path == tmp_path / "h.png" and Image.open(path).format == "PNG" and Image.open(path).size[0] > 500


def test_holdout_labels_do_not_collide_and_coincident_points_share_one():
    from search.plots import _plt, merge_coincident, place_labels

    plt = _plt()

    # euler's default spacing and linspace give the same row to 4 digits: one marker, one label, the highlight first
    pts = merge_coincident([(0.0138, 4.5060, "linspace"), (0.0138, 4.5061, "euler default"), (1.1e-3, 3.0, "learned"),
                            (1.1e-3, 3.2, "uniform")], first="euler default")
    assert [names for _, _, names in pts] == [("learned",), ("uniform",), ("euler default", "linspace")]
    # a cluster where every label on the right of its point would run into the next one
    fig, ax = plt.subplots(figsize=(6, 4))
    xy = [(1.0e-3, 2.0), (1.15e-3, 2.05), (1.3e-3, 2.0), (1.2e-3, 1.95), (5e-3, 3.0)]
    ax.scatter(*zip(*xy))
    ax.set(xscale="log", yscale="log", xlim=(5e-4, 1e-2), ylim=(1.5, 4))
    fig.tight_layout()
    anns = place_labels(ax, [(x, y, f"dpmsolver++{i} default", False) for i, (x, y) in enumerate(xy)], xy)
    r = fig.canvas.get_renderer()
    boxes = [a.get_window_extent(r) for a in anns]
    assert len(anns) == len(xy) and len(ax.texts) == len(xy)  # the rejected candidates are removed
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert not boxes[i].overlaps(boxes[j]), (anns[i].get_text(), anns[j].get_text())
    plt.close(fig)
