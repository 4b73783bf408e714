"""A tiny sweep tracked by a real `mlflow server`, read back through its REST API; export --run through it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

import pytest
import torch

from pipeline.evaluation.inprocess import InProcessEvaluator
from pipeline.models.load import load_model
from search.sweep import SweepConfig, run_sweep


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    from jobs.ui import command

    cmd = command(f"sqlite:///{tmp / 'mlflow.db'}", "127.0.0.1", port)
    cmd += ["--artifacts-destination", str(tmp / "artifacts")]
    proc = subprocess.Popen(cmd, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "MLFLOW_TRACKING_URI": ""}, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if _get(f"{url}/health", 2) .strip() == b"OK":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not come up (exit {proc.poll()})")
            time.sleep(0.5)
        yield url
    finally:
        # the server and its uvicorn worker share the session we started it in: stop exactly those
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        except ProcessLookupError:
            pass


def test_sweep_runs_read_back_through_rest(server, tmp_path, capsys):
    ring8 = load_model("gmm:ring8")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = SweepConfig(model="gmm:ring8", nfe=5, trials=7, parallel=2, num_seeds=16, holdout_seeds=16,
                          baselines=("uniform", "karras", "dp"), teacher_nfe=50, dp_seeds=8, dp_grid=30, grid_seeds=9)
        res = run_sweep(cfg, study_name="rest", out_dir=tmp_path, model=ring8, tracking_uri=server,
                        experiment="rest-test", evaluators=lambda s: InProcessEvaluator(ring8, s, teacher_nfe=50),
                        figures=False, log=lambda *_: None)
    finally:
        torch.set_num_threads(n)
    exp = json.loads(_get(f"{server}/api/2.0/mlflow/experiments/get-by-name?experiment_name=rest-test"))["experiment"]
    runs = _post(f"{server}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 100})["runs"]
    by_id = {r["info"]["run_id"]: r for r in runs}
    parent = by_id[res.parent_run_id]
    assert parent["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in parent["data"]["params"]}
    assert params["nfe"] == "5" and params["model"] == "gmm:ring8"
    metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    assert metrics["holdout_recon"] == pytest.approx(res.rows[0]["holdout_recon"])
    kids = [r for r in runs if {t["key"]: t["value"] for t in r["data"].get("tags", [])}.get("mlflow.parentRunId")
            == res.parent_run_id]
    assert len(kids) == 7
    done = [k for k in kids if any(t["key"] == "state" and t["value"] == "COMPLETE" for t in k["data"]["tags"])]
    assert done and all(any(m["key"] == "recon" for m in k["data"]["metrics"]) for k in done)

    # export --run downloads the best schedule through the server
    from jobs.cli import main

    out = tmp_path / "from_run.json"
    assert main(["export", "--run", res.parent_run_id, "--tracking-uri", server, "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["timesteps"] == list(res.best.timesteps) and d["provenance"]["mlflow_run_id"] == res.parent_run_id
    capsys.readouterr()
    assert main(["export", "--run", "0" * 32, "--tracking-uri", server, "--out", str(out)]) == 2
    assert "no MLflow run" in capsys.readouterr().err


def test_ui_command_binds_localhost(capsys, tmp_path):
    from jobs.cli import main

    assert main(["ui", "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--print-command"]) == 0
    out = capsys.readouterr().out
    assert "--host 127.0.0.1" in out and f"sqlite:///{tmp_path}/m.db" in out and "mlflow server" in out
