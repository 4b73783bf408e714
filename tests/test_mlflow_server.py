"""A real `mlflow server` (what `stridelab ui` runs): its UI page and assets, a tiny sweep tracked through it and
read back through its REST API, export --run through it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request

import pytest
import torch

from pipeline.evaluation.inprocess import InProcessEvaluator
from pipeline.models.load import load_model
from search.sweep import SweepConfig, run_sweep


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


_LISTENING = re.compile(rb"Uvicorn running on http://127\.0\.0\.1:(\d+)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `mlflow server` (the command `stridelab ui` runs) on a port the server itself picks (--port 0,
    read back from uvicorn's "running on" line), so no other process can take it between pick and bind."""
    tmp = tmp_path_factory.mktemp("mlflow")
    from jobs.ui import command

    cmd = command(f"sqlite:///{tmp / 'mlflow.db'}", "127.0.0.1", 0)
    cmd += ["--artifacts-destination", str(tmp / "artifacts")]
    log_path = tmp / "server.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(cmd, cwd=tmp, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "MLFLOW_TRACKING_URI": ""}, start_new_session=True)
    try:
        deadline = time.monotonic() + 180  # ~10 s idle; minutes when the 2 cores are shared
        url = None
        while True:
            if url is None and (m := _LISTENING.search(log_path.read_bytes())):
                url = f"http://127.0.0.1:{int(m.group(1))}"
            if url is not None:
                try:
                    if _get(f"{url}/health", 2).strip() == b"OK":
                        break
                except OSError:
                    pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not come up (exit {proc.poll()}):\n"
                            f"{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        # the server and its uvicorn worker share the session we started it in: stop exactly those
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        except ProcessLookupError:
            pass
        log.close()


def test_ui_page_is_the_mlflow_app(server):
    """The page `stridelab ui` opens: the MLflow single-page app's HTML, and the script and stylesheet it
    loads are served (the JavaScript is MLflow's: it calls the tracking REST API)."""
    with urllib.request.urlopen(f"{server}/", timeout=30) as r:
        assert r.status == 200 and r.headers.get_content_type() == "text/html"
        page = r.read().decode()
    assert "<title>MLflow</title>" in page and 'id="root"' in page, page[:500]
    scripts = re.findall(r'<script[^>]+src="\.?/?(static-files/[^"]+\.js)"', page)
    styles = re.findall(r'<link[^>]+href="\.?/?(static-files/[^"]+\.css)"', page)
    assert scripts and styles, page
    with urllib.request.urlopen(f"{server}/{scripts[0]}", timeout=60) as r:
        assert r.status == 200 and r.headers.get_content_type() in ("text/javascript", "application/javascript")
        js = r.read()
    assert len(js) > 100_000 and b"ajax-api/2.0/mlflow/experiments/" in js
    with urllib.request.urlopen(f"{server}/{styles[0]}", timeout=30) as r:
        assert r.status == 200 and r.headers.get_content_type() == "text/css" and len(r.read()) > 1000
    # and an asset the page does not reference is a 404, not the page again
    with pytest.raises(urllib.error.HTTPError) as e:
        _get(f"{server}/static-files/static/js/no-such-file.js")
    assert e.value.code == 404


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
