"""The MLflow tracking server stops mid-sweep and comes back later: the sweep neither dies nor loses a trial's
record (the Tracker queues writes and replays them; see search/tracking.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request

import optuna
import pytest
import torch

from pipeline.evaluation.inprocess import InProcessEvaluator
from pipeline.models.load import load_model
from search.sweep import SweepConfig, run_sweep
from search.tracking import HTTP_RETRY_DEFAULTS

pytestmark = pytest.mark.slow  # two server start-ups (~15 s each on a shared 2-core box) and the outage


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real `mlflow server` (the command `stridelab ui` runs) on a fixed port, stoppable and restartable."""

    def __init__(self, tmp, port: int):
        from jobs.ui import command

        self.cmd = command(f"sqlite:///{tmp / 'mlflow.db'}", "127.0.0.1", port)
        self.url, self.log, self.proc = f"http://127.0.0.1:{port}", (tmp / "server.log").open("ab"), None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "MLFLOW_TRACKING_URI": ""})

    def wait_healthy(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.read().strip() == b"OK":
                        return
            except OSError:
                pass
            assert self.proc.poll() is None and time.monotonic() < deadline, "mlflow server did not come up"
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(10)
                break
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                break
        try:  # the group's huey job consumers outlive the leader's TERM (see jobs/ui.py `keep`)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc = None


class StopsServer:
    """An evaluator that stops the tracking server after the `k`-th batch of all of them (`events` is shared) and
    restarts it `down_s` later; once per test."""

    def __init__(self, inner, server: Server, k: int, down_s: float, events: list):
        self.inner, self.server, self.k, self.down_s, self.events = inner, server, k, down_s, events

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def evaluate(self, *args, **kwargs):
        out = self.inner.evaluate(*args, **kwargs)
        self.events.append(("batch", time.monotonic()))
        if [e for e, _ in self.events].count("batch") == self.k:
            self.server.stop()
            self.events.append(("stopped", time.monotonic()))

            def restart():
                time.sleep(self.down_s)
                self.server.start()
                self.events.append(("restarted", time.monotonic()))
            th = threading.Thread(target=restart, daemon=True)
            self.events.append(("thread", th))
            th.start()
        return out


def test_server_outage_mid_sweep_loses_no_trial(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    for k in HTTP_RETRY_DEFAULTS:  # the Tracker sets them where unset; undo that after the test
        monkeypatch.delenv(k, raising=False)
    server = Server(tmp_path, _free_port())
    server.start()
    ring8, events, lines = load_model("gmm:ring8"), [], []
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        server.wait_healthy()
        cfg = SweepConfig(model="gmm:ring8", nfe=5, trials=8, parallel=2, num_seeds=16, holdout_seeds=8,
                          baselines=("uniform", "karras"), teacher_nfe=30, polish=0)
        storage = str(tmp_path / "optuna.journal")
        res = run_sweep(cfg, study_name="outage", storage=storage, out_dir=tmp_path, model=ring8,
                        tracking_uri=server.url, experiment="outage",
                        evaluators=lambda s: StopsServer(InProcessEvaluator(ring8, s, teacher_nfe=30), server, 2,
                                                         5.0, events),
                        figures=False, log=lines.append)
        assert [e for e, _ in events if e not in ("batch", "thread")] == ["stopped", "restarted"]
        assert any("unreachable" in ln and "queueing" in ln for ln in lines), lines
        assert any("replayed" in ln for ln in lines), lines

        study = optuna.load_study(study_name="outage", storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(storage)))
        counted = sorted(t.number for t in study.trials if t.state.is_finished())
        assert len(counted) >= cfg.trials
        client = MlflowClient(server.url)
        parent = client.get_run(res.parent_run_id)
        assert parent.info.status == "FINISHED"
        kids = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{res.parent_run_id}'",
                                  max_results=1000)
        assert sorted(int(r.data.tags["trial"]) for r in kids) == counted  # one each: none lost, none twice
        assert all(r.info.status in ("FINISHED", "FAILED") for r in kids)
        assert "finished" in parent.data.tags["mlflow.note.content"]
    finally:
        torch.set_num_threads(n)
        for th in [th for e, th in events if e == "thread"]:
            th.join()  # it may still be starting the server again
        server.stop()
        server.log.close()
