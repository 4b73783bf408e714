"""The Optuna RDB storage is unreachable for a few seconds mid-sweep (an SQLite file locked by another writer,
``BEGIN EXCLUSIVE`` held for 8 s, longer than sqlite3's default 5 s busy timeout): the sweep waits it out and
finishes with exactly the requested trials, none duplicated (`search.study.rdb_engine_kwargs`)."""

from __future__ import annotations

import sqlite3
import threading
import time

import optuna
import pytest

from pipeline.evaluation.inprocess import InProcessEvaluator
from pipeline.models.load import load_model
from search.study import make_storage
from search.sweep import SweepConfig, run_sweep

LOCK_S = 8.0


class LocksStorage:
    """An evaluator that, after the `k`-th batch of all of them (`events` is shared), locks the SQLite file
    from another connection for `LOCK_S` seconds and returns while the lock is held."""

    def __init__(self, inner, db, k: int, events: list):
        self.inner, self.db, self.k, self.events = inner, db, k, events

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def evaluate(self, *args, **kwargs):
        out = self.inner.evaluate(*args, **kwargs)
        self.events.append("batch")
        if self.events.count("batch") == self.k:
            con = sqlite3.connect(self.db, isolation_level=None, check_same_thread=False)
            con.execute("BEGIN EXCLUSIVE")
            self.events.append("locked")

            def release():
                time.sleep(LOCK_S)
                con.execute("COMMIT")
                con.close()
                self.events.append("released")
            threading.Thread(target=release, daemon=True).start()
        return out


@pytest.mark.usefixtures("one_thread")
def test_locked_sqlite_storage_mid_sweep_is_waited_out(tmp_path):
    """End to end. Note: this one also passed with sqlite3's 5 s default timeout (not understood yet: some
    write of the sweep seems to land outside the lock); the storage-level test below is the one that fails
    without `rdb_engine_kwargs`."""
    db = tmp_path / "optuna.db"
    url = f"sqlite:///{db}"
    ring8, events = load_model("gmm:ring8"), []
    cfg = SweepConfig(model="gmm:ring8", nfe=5, trials=8, parallel=2, num_seeds=16, holdout_seeds=8,
                      baselines=("uniform", "karras"), teacher_nfe=30, polish=0)
    t0 = time.monotonic()
    run_sweep(cfg, study_name="blip", storage=url, out_dir=tmp_path, model=ring8, track=False,
              evaluators=lambda s: LocksStorage(InProcessEvaluator(ring8, s, teacher_nfe=30), db, 2, events),
              figures=False, log=lambda *_: None)
    assert "locked" in events and "released" in events
    assert time.monotonic() - t0 > LOCK_S  # the sweep really waited on the lock
    trials = optuna.load_study(study_name="blip", storage=make_storage(url)).trials
    assert sorted(t.number for t in trials) == list(range(cfg.trials))  # exactly the trials asked, none twice
    assert all(t.state.is_finished() for t in trials)
    with sqlite3.connect(db) as con:
        assert con.execute("select count(*) from trials").fetchone()[0] == cfg.trials


def test_write_under_another_writers_lock_waits_instead_of_failing(tmp_path):
    """The storage itself: ask and tell while another connection holds ``BEGIN EXCLUSIVE`` for `LOCK_S`
    (with sqlite3's default 5 s busy timeout this raises "database is locked" after 5 s)."""
    url = f"sqlite:///{tmp_path / 'b.db'}"
    study = optuna.create_study(storage=make_storage(url), study_name="b")
    study.tell(study.ask(), 1.0)
    con = sqlite3.connect(tmp_path / "b.db", isolation_level=None, check_same_thread=False)
    con.execute("BEGIN EXCLUSIVE")
    timer = threading.Timer(LOCK_S, lambda: (con.execute("COMMIT"), con.close()))
    timer.start()
    t0 = time.monotonic()
    try:
        study.tell(study.ask(), 2.0)
    finally:
        timer.join()
    assert time.monotonic() - t0 >= LOCK_S - 0.5
    assert [(t.number, t.value) for t in study.trials] == [(0, 1.0), (1, 2.0)]
