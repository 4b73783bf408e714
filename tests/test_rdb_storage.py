"""The Optuna RDB storage path (`--storage sqlite:///...`, the same code as `postgresql://`): a tiny CLI sweep
into an SQLite database, a driver that died mid-trial, `--resume` to an exact trial count, export from it."""

from __future__ import annotations

import json
import sqlite3

import optuna
import pytest
from optuna.trial import TrialState

from jobs.cli import main
from search.study import finished_count, make_storage

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


def _sweep(tmp_path, url, trials, *extra):
    return main(["sweep", "--model", "gmm:ring8", "--nfe", "5", "--trials", str(trials), "--parallel", "2",
                 "--num-seeds", "16", "--holdout-seeds", "8", "--teacher-nfe", "50", "--schedules", "uniform,karras",
                 "--polish", "2", "--storage", url, "--study-name", "rdb", "--out-dir", str(tmp_path / "out"),
                 "--actors", "0", "--no-mlflow", "--no-holdout-fid", *extra])


def test_sqlite_url_sweep_then_resume_exact_trials(tmp_path, capsys):
    db = tmp_path / "optuna.db"
    url = f"sqlite:///{db}"
    # --resume before the database exists is refused, and does not create it
    assert _sweep(tmp_path, url, 6, "--resume") == 2
    assert "no study named 'rdb'" in capsys.readouterr().err and not db.exists()

    assert _sweep(tmp_path, url, 6) == 0
    # a real Optuna RDB in that file (not a journal next to it)
    assert isinstance(make_storage(url), optuna.storages.RDBStorage)
    with sqlite3.connect(db) as con:
        tables = {r[0] for r in con.execute("select name from sqlite_master where type = 'table'")}
        assert {"studies", "trials", "trial_values", "trial_params", "trial_user_attributes"} <= tables
        assert con.execute("select count(*) from trials").fetchone()[0] == 6
    assert not (tmp_path / "out" / "optuna.journal").exists()
    study = optuna.load_study(study_name="rdb", storage=url)
    assert finished_count(study) == 6
    first = {t.number: (t.state, t.values, t.user_attrs["timesteps"]) for t in study.trials}
    stale = study.ask()  # a driver killed mid-trial leaves this RUNNING in the database

    assert _sweep(tmp_path, url, 6) == 2  # the study exists: without --resume, refused
    assert "already exists" in capsys.readouterr().err
    assert _sweep(tmp_path, url, 10, "--resume") == 0
    study = optuna.load_study(study_name="rdb", storage=url)
    assert finished_count(study) == 10 and len(study.trials) == 11
    t = study.trials[stale.number]
    assert t.state == TrialState.FAIL and t.user_attrs["stale"] is True
    assert not [t for t in study.trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert sum(t.user_attrs.get("kind") == "baseline" for t in study.trials) == 2  # warm starts not re-added
    for n, before in first.items():  # the first run's trials kept as they were
        t = study.trials[n]
        assert (t.state, t.values, t.user_attrs["timesteps"]) == before

    # other settings on resume are refused; export reads the sweep's exported trial (chosen on its validation
    # seeds, recorded on the study) from the database
    assert _sweep(tmp_path, url, 12, "--resume", "--nfe", "4") == 2
    assert "other settings" in capsys.readouterr().err
    out = tmp_path / "s.json"
    assert main(["export", "--study-name", "rdb", "--storage", url, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["timesteps"] == study.trials[study.user_attrs["selected_trial"]].user_attrs["timesteps"]


def test_postgresql_url_reaches_the_rdb_storage(tmp_path, cli_stderr):
    """`postgresql://` takes the same RDBStorage path; with no server (and here no psycopg2, which docs/CLUSTER.md
    installs on the cluster) it is one line on stderr and exit 2, never a traceback or a journal file."""
    url = "postgresql://stridelab@127.0.0.1:9/optuna"  # port 9 (discard): nothing listens there
    assert _sweep(tmp_path, url, 4) == 2
    err = cli_stderr()
    assert len(err) == 1 and url in err[0], err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("optuna.journal"))
