"""The main job (`make sweep` = `stridelab sweep` with its defaults: bundled:digits, digits FID, 2 local Ray
actors, every baseline and dp, a 250-step teacher, MLflow in ./mlflow.db, the journal in results/sweep/)
run exactly as users run it, with only the budget flags cut down (trials, seeds, polish)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from pipeline.core.schedules import Schedule
from search.study import finished_count, make_storage
from search.sweep import DEFAULT_BASELINES

ROOT = Path(__file__).resolve().parents[1]
TRIALS, POLISH = 16, 2  # 10 warm starts + 4 TPE + 2 polish

pytestmark = pytest.mark.slow  # a 250-step teacher on 2 x 16 seeds, 16 trials, held-out FID: minutes on 2 cores


@pytest.mark.timeout(1200)  # about 4 min idle; the hang guard, not a speed test (10 min was hit on a loaded machine)
def test_default_sweep_small_budget(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
    budget = ["--trials", str(TRIALS), "--polish", str(POLISH), "--num-seeds", "16", "--holdout-seeds", "16",
              "--validation-seeds", "16"]
    r = subprocess.run([sys.executable, "-m", "jobs.cli", "sweep", *budget], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    journal = tmp_path / "results" / "sweep" / "optuna.journal"
    (summary,) = optuna.get_all_study_summaries(make_storage(journal))
    study = optuna.load_study(study_name=summary.study_name, storage=make_storage(journal))
    assert finished_count(study) == len(study.trials) == TRIALS
    kinds = [t.user_attrs.get("kind") for t in study.trials]
    assert kinds.count("baseline") == len(DEFAULT_BASELINES) and kinds.count("polish") == POLISH
    warm = {t.user_attrs["schedule"] for t in study.trials if t.user_attrs.get("kind") == "baseline"}
    assert warm == set(DEFAULT_BASELINES)
    assert all(t.state == TrialState.COMPLETE for t in study.trials if t.user_attrs.get("kind") == "baseline")

    out = tmp_path / "results" / "sweep" / summary.study_name
    with open(out / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["schedule"].startswith("learned") and rows[-1]["schedule"].startswith("teacher")
    # learned, the warm starts, every other solver's own default at the same NFE (reference rows), the teacher
    from pipeline.solvers import SOLVERS

    assert len(rows) == 1 + len(DEFAULT_BASELINES) + (len(SOLVERS) - 1) + 1
    assert {r["solver"] for r in rows if r["schedule"].endswith(" default")} == set(SOLVERS) - {"ddim"}
    assert float(rows[-1]["holdout_recon"]) == 0 and all(float(x["holdout_recon"]) > 0 for x in rows[:-1])
    assert all(float(x["holdout_fid"]) > 0 for x in rows)  # digits FID on every row, the teacher's the floor
    best = Schedule.load(out / "best_schedule.json")  # the trial chosen on the validation seeds
    assert best.nfe == 10 and list(best.timesteps) == study.trials[study.user_attrs["selected_trial"]].user_attrs["timesteps"]
    assert any(ln.startswith("verdict: ") for ln in r.stdout.splitlines())
    for f in ("trials.parquet", "steps.png", "history.png", "samples.png", "holdout.png"):
        assert (out / f).is_file(), f

    from mlflow import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (parent,) = c.search_runs([c.get_experiment_by_name("stridelab-sweep").experiment_id],
                              "tags.`stridelab.kind` = 'sweep'")
    assert parent.info.status == "FINISHED" and parent.data.params["model"] == "bundled:digits"
    kids = c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                         max_results=100)
    assert sorted(int(k.data.tags["trial"]) for k in kids) == list(range(TRIALS))
    assert "best_schedule.json" in r.stdout and "stridelab ui" in r.stdout  # ends with the export and the UI
