"""Trust at any budget: the held-out ratios' paired bootstrap intervals, the verdict line, the choice of the
exported trial on validation seeds, and how `trials` splits into warm starts, sampler trials and polish."""

from __future__ import annotations

import json

import numpy as np
import optuna
import pytest
import torch
from optuna.trial import TrialState

from pipeline.core.schedules import make_schedule
from pipeline.errors import StridelabError
from pipeline.evaluation.inprocess import InProcessEvaluator
from pipeline.metrics.recon import paired_ratio_interval
from pipeline.models.load import load_model
from search import export
from search.space import make_space
from search.study import make_storage
from search.sweep import SweepConfig
from search.sweep.holdout import evaluate_by_solver, holdout_rows, learned_schedule, verdict
from search.sweep.select import candidates, select_trial

TEACHER_NFE = 100

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


@pytest.fixture(scope="module")
def ring8():
    return load_model("gmm:ring8")


# -- the paired bootstrap -------------------------------------------------------------------------------
def test_identical_schedules_give_exactly_one():
    b = np.random.default_rng(0).lognormal(-6, 2, 256)  # heavy-tailed, as per-seed recon is
    assert paired_ratio_interval(b, b.copy()) == (1.0, 1.0)


def test_a_constant_factor_gives_that_ratio_whatever_the_tails():
    # pairing: every replicate resamples both vectors with the same seeds, so the tails cancel exactly;
    # resampling them independently would give an interval spanning orders of magnitude here
    b = np.random.default_rng(1).lognormal(-6, 2, 256)
    lo, hi = paired_ratio_interval(3 * b, b)
    assert lo == pytest.approx(3, rel=1e-12) and hi == pytest.approx(3, rel=1e-12)


def test_three_seeds_known_case():
    # 27 equally likely resamples of (1, 2, 3) over a constant 1: P(mean = 1) = P(mean = 3) = 1/27 > 2.5%,
    # so the 95% percentile interval is exactly the extreme means
    assert paired_ratio_interval([1.0, 2.0, 3.0], [1.0, 1.0, 1.0]) == (1.0, 3.0)


def test_large_sample_matches_the_normal_interval():
    # a ratio over a constant denominator is a mean: its bootstrap interval is mean +- 1.96 sd / sqrt(n)
    a = np.random.default_rng(2).normal(1.0, 0.2, 2000)
    lo, hi = paired_ratio_interval(a, np.ones_like(a))
    half = 1.96 * a.std() / np.sqrt(a.size)
    assert lo == pytest.approx(a.mean() - half, abs=0.1 * half) and hi == pytest.approx(a.mean() + half, abs=0.1 * half)


def test_deterministic_and_checked():
    a, b = np.random.default_rng(3).lognormal(size=(2, 64))
    assert paired_ratio_interval(a, b) == paired_ratio_interval(a, b)
    assert paired_ratio_interval(a, b) != paired_ratio_interval(a, b, seed=1)
    for bad in (dict(a=a, b=b[:10]), dict(a=a, b=-b), dict(a=a, b=b, level=1.0)):
        with pytest.raises(StridelabError):
            paired_ratio_interval(**bad)


# -- held-out table and verdict -------------------------------------------------------------------------
def test_holdout_rows_carry_paired_intervals(ring8):
    ev = InProcessEvaluator(ring8, list(range(1_000_000, 1_000_048)), teacher_nfe=TEACHER_NFE)
    uni, quad = (make_schedule(n, 10, ring8.alphas_cumprod) for n in ("uniform", "quadratic"))
    named = {"learned": uni, "uniform": uni, "quadratic": quad}
    rows = holdout_rows(named, ev.evaluate(list(named.values())), {})
    by = {r["schedule"]: r for r in rows}
    best = min(("uniform", "quadratic"), key=lambda n: by[n]["holdout_recon"])
    assert (by[best]["x_best_baseline_lo"], by[best]["x_best_baseline_hi"]) == (1.0, 1.0)
    for r in rows:
        assert r["x_best_baseline_lo"] <= r["x_best_baseline"] <= r["x_best_baseline_hi"]
        assert r["x_best_default_pair_lo"] <= r["x_best_default_pair"] <= r["x_best_default_pair_hi"]
    # the learned row is uniform itself: its interval against uniform is exactly [1, 1] when uniform is best
    if best == "uniform":
        assert verdict(rows).kind == "baseline"



def test_held_out_progress_counts_every_schedule_once_per_solver_call(ring8):
    """The held-out bar ticks by the schedules each evaluation call finished: one call per solver, in order."""
    ev = InProcessEvaluator(ring8, list(range(1_000_000, 1_000_008)), teacher_nfe=TEACHER_NFE)
    uni, quad = (make_schedule(n, 4, ring8.alphas_cumprod) for n in ("uniform", "quadratic"))
    entries = [("uniform", uni, "ddim"), ("quadratic", quad, "ddim"), ("2m", uni, "dpmsolver++2m")]
    ticks: list[int] = []
    got = evaluate_by_solver(ev, entries, "ddim", on_done=ticks.append)
    assert ticks == [2, 1]
    assert [r.schedule.timesteps for r in got] == [uni.timesteps, quad.timesteps, uni.timesteps]
    assert not torch.equal(got[2].recon, got[0].recon)  # the reference row ran its own solver

def _rows(lo, hi, learned_ts="1 0"):
    return [{"schedule": "learned", "holdout_recon": 1.0, "x_best_baseline": (lo + hi) / 2, "x_best_baseline_lo": lo,
             "x_best_baseline_hi": hi, "timesteps": learned_ts},
            {"schedule": "uniform", "holdout_recon": 1.0, "x_best_baseline": 1.0, "x_best_baseline_lo": 1.0,
             "x_best_baseline_hi": 1.0, "timesteps": "900 0"}]


@pytest.mark.parametrize("lo, hi, kind", [(0.5, 0.9, "better"), (0.8, 1.2, "unclear"), (1.1, 2.0, "worse")])
def test_verdict_reads_the_interval(lo, hi, kind):
    v = verdict(_rows(lo, hi))
    assert v.kind == kind and "uniform" in v.text and "\n" not in v.text
    if kind != "better":  # what to do: more seeds, named as parameters the CLI renders as its flags
        assert "`num_seeds`" in v.text and "`validation_seeds`" in v.text
    if kind == "worse":
        assert "exported anyway" in v.text
    assert verdict(_rows(1.0, 1.0, "900 0")).kind == "baseline"
    # the baseline's steps with a model time shift (a time-shift trial started from it) are another schedule
    for extra in ({"model_shift": "+0.100 -0.200"}, {"encode_shift": "+0.300 +0.000"}):
        rows = _rows(0.5, 0.9, "900 0")
        rows[0].update(extra)
        assert verdict(rows).kind == "better"


# -- validation selection ------------------------------------------------------------------------------
def _study_with_an_overfit_trial(ring8) -> optuna.Study:
    """Warm starts uniform and quadratic with their honest tuning values, and one 'search' trial whose schedule
    is poor (all steps crowded at high noise) but whose recorded tuning value beats both: what a schedule fitted
    to a few lucky tuning seeds looks like to the study."""
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), study_name="v")
    space = make_space("steps", 10, ring8.alphas_cumprod)
    tune = InProcessEvaluator(ring8, list(range(24)), teacher_nfe=TEACHER_NFE)
    bad = make_schedule("beta", 10, ring8.alphas_cumprod)
    scheds = {n: make_schedule(n, 10, ring8.alphas_cumprod) for n in ("uniform", "quadratic")}
    for (name, s), r in zip(scheds.items(), tune.evaluate(list(scheds.values()))):
        v = float(r.recon.mean())
        study.add_trial(optuna.trial.create_trial(
            params=space.params_of(s), distributions=space.distributions(), value=v,
            user_attrs={"kind": "baseline", "schedule": name, "timesteps": list(s.timesteps), "recon": v}))
    study.add_trial(optuna.trial.create_trial(
        params=space.params_of(bad), distributions=space.distributions(), value=1e-9,
        user_attrs={"kind": "search", "schedule": "learned", "timesteps": list(bad.timesteps), "recon": 1e-9}))
    return study


def test_validation_hands_out_the_baseline_when_the_best_trial_was_luck(ring8):
    study = _study_with_an_overfit_trial(ring8)
    c = SweepConfig(model="gmm:ring8", trials=14, num_seeds=24, validation_seeds=32, baselines=("uniform", "quadratic"),
                    teacher_nfe=TEACHER_NFE, space="steps")
    assert [t.number for t in candidates(study)] == [2, 0, 1] or [t.number for t in candidates(study)] == [2, 1, 0]
    ev = InProcessEvaluator(ring8, c.validation_seed_list, teacher_nfe=TEACHER_NFE)
    lines: list[str] = []
    sel = select_trial(c, study, ev, ring8.num_train_timesteps, lines.append)
    assert sel.tuning_best.number == 2 and sel.trial.number != 2  # the study's best, rejected on fresh seeds
    assert sel.trial.user_attrs["kind"] == "baseline" and set(sel.validation) == {0, 1, 2}
    assert sel.validation[sel.trial.number] == min(sel.validation.values())
    assert learned_schedule(sel.trial, "steps", 1000)[0] == f"learned (= {sel.trial.user_attrs['schedule']})"
    assert "not trial 2" in lines[0]
    # recorded on the study: `stridelab export --study-name` exports the same trial
    assert export.best_trial(study).number == sel.trial.number and export.best_trial(study, selected=False).number == 2
    # the validation seeds are disjoint from the tuning and held-out seeds
    assert not set(c.validation_seed_list) & (set(c.tuning_seeds) | set(c.holdout_seed_list))


def test_a_candidate_replaces_the_best_only_beyond_the_validation_noise():
    """guarded_choice: near-equal candidates (a heavy-tailed draw a few percent lower) leave the tuning best in
    place; one clearly better on the paired seeds replaces it; without per-seed errors the least value wins."""
    from types import SimpleNamespace

    from search.sweep.select import guarded_choice

    rng = np.random.default_rng(0)
    best_err = rng.lognormal(-7, 1.5, size=64)  # heavy-tailed per-seed errors, as on the digits model
    close = best_err * rng.lognormal(-0.03, 0.3, size=64)  # a slightly lower mean, but noise-sized
    clear = best_err * 0.5
    best, a, b = (SimpleNamespace(number=i) for i in range(3))
    scores = {0: best_err.mean(), 1: close.mean(), 2: clear.mean()}
    assert scores[1] < scores[0]  # the plain least mean would switch
    assert guarded_choice(best, [best, a], {0: scores[0], 1: scores[1]}, {0: best_err, 1: close}) is best
    assert guarded_choice(best, [best, a, b], scores, {0: best_err, 1: close, 2: clear}) is b
    assert guarded_choice(best, [best, a], {0: 2.0, 1: 1.0}, {}) is a  # FID: no per-seed errors


def test_no_validation_exports_the_best_trial(ring8):
    study = _study_with_an_overfit_trial(ring8)
    c = SweepConfig(model="gmm:ring8", trials=14, num_seeds=24, validation_seeds=0, baselines=("uniform",))
    assert not c.validating and select_trial(c, study, None, 1000).trial.number == 2
    assert not SweepConfig(objective="recon,fid", sampler="nsga2", validation_seeds=64).validating


# -- the trial budget ----------------------------------------------------------------------------------
def test_default_budget_keeps_its_split():
    c = SweepConfig()  # the default sweep: 150 trials, 10 warm starts (9 schedules and dp), polish 80
    assert (len(c.baselines), c.search_trials, c.polish_trials) == (10, 60, 80) and c.budget_note() is None


def test_small_budget_still_searches():
    c = SweepConfig(trials=30)  # polish 80 asked: it would take all 20 trials after the warm starts
    assert (c.search_trials, c.polish_trials) == (7, 13)
    assert c.budget_note() == ("`polish` 80 capped to 13: polish takes at most 2/3 of the 20 `trials` after the "
                               "warm starts")


def test_two_objectives_polish_nothing_and_say_so():
    c = SweepConfig(objective="recon,fid", sampler="nsga2")
    assert (c.polish_trials, c.search_trials) == (0, 150 - 10)
    assert "ignored" in c.budget_note() and "`polish` 80" in c.budget_note()


# -- end to end: the CLI prints the verdict with its flags, tracks it, exports it ----------------------------
def test_cli_sweep_prints_tracks_and_exports_the_verdict(tmp_path, capsys):
    from mlflow import MlflowClient

    from jobs.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["sweep", "--model", "gmm:ring8", "--trials", "12", "--parallel", "3", "--num-seeds", "16",
            "--holdout-seeds", "24", "--validation-seeds", "16", "--teacher-nfe", str(TEACHER_NFE), "--actors", "0",
            "--schedules", "uniform,quadratic,dp", "--no-holdout-fid", "--out-dir", str(tmp_path), "--tracking-uri", uri]
    assert main([*argv, "--study-name", "t"]) == 0  # polish 80 (the default) capped to 2/3 of the 9 left
    out = capsys.readouterr().out
    assert "--polish 80 capped to 6: polish takes at most 2/3 of the 9 --trials after the warm starts" in out
    assert "trials by phase: 3 warm starts, 3 tpe, 6 polish" in out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("verdict: ")]
    assert "`" not in line  # parameters rendered as flags
    assert "x_best_baseline 95%" in out
    obj = json.loads((tmp_path / "t" / "best_schedule.json").read_text())
    assert obj["metrics"]["x_best_baseline_lo"] <= obj["metrics"]["x_best_baseline"] <= obj["metrics"]["x_best_baseline_hi"]
    words = {"better": "better", "unclear": "not distinguishable", "worse": "worse", "baseline": "best baseline"}
    assert words[obj["metrics"]["verdict"]] in line and obj["provenance"]["verdict"].split(":")[0] in line
    assert obj["provenance"]["validation_seeds"] == [2_000_000, 16]
    study = optuna.load_study(study_name="t", storage=make_storage(tmp_path / "optuna.journal"))
    assert obj["provenance"]["trial"] == study.user_attrs["selected_trial"]
    assert obj["timesteps"] == study.trials[obj["provenance"]["trial"]].user_attrs["timesteps"]
    c = MlflowClient(uri)
    (run,) = c.search_runs([c.get_experiment_by_name("stridelab-sweep").experiment_id], "tags.`stridelab.kind` = 'sweep'")
    assert run.data.tags["verdict"] == obj["metrics"]["verdict"]
    assert {k: run.data.metrics[k] for k in ("warm_starts", "search_trials", "polish_trials")} == {
        "warm_starts": 3, "search_trials": 3, "polish_trials": 6}
    assert "x_best_baseline_hi" in run.data.metrics

    # two objectives: polish 0, said so, and tracked as 0
    assert main([*argv, "--study-name", "t2", "--objective", "recon,fid", "--optuna-sampler", "nsga2"]) == 0
    out = capsys.readouterr().out
    assert "--polish 80 ignored: polish needs a single objective" in out
    assert "trials by phase: 3 warm starts, 9 nsga2, 0 polish" in out
    (run2,) = [r for r in c.search_runs([run.info.experiment_id], "tags.`stridelab.kind` = 'sweep'")
               if r.info.run_id != run.info.run_id]
    assert run2.data.metrics["polish_trials"] == 0 and run2.data.metrics["search_trials"] == 9
    assert all(t.user_attrs.get("kind") != "polish" for t in optuna.load_study(
        study_name="t2", storage=make_storage(tmp_path / "optuna.journal")).trials if t.state == TrialState.COMPLETE)
