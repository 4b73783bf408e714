"""A real `ray job submit` of `stridelab sweep` to a local Ray head, as docs/CLUSTER.md says to rehearse it.

The head is this test's own: its own ports (every one Ray opens on a fixed port is given a free one, so
it cannot collide with another head on this machine or with the session fixture `ray_local`), its own
short ``--temp-dir`` under /tmp (Ray's unix sockets must fit in 107 bytes), its own token
(``RAY_AUTH_MODE=token`` + ``RAY_AUTH_TOKEN``: Ray 2.60 heads enable token auth and the job CLI refuses
without the mode set). Teardown kills that head's processes by their process group and by its
temp dir, never `ray stop` (which stops every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ports import free_ports

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"

pytestmark = pytest.mark.slow  # ~1-2 min on 2 cores: head start, upload, sweep, teardown



def _pids_mentioning(needle: str) -> list[int]:
    """Processes whose command line contains `needle` (this head's temp dir or this test's tmp dir)."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            if needle in p.joinpath("cmdline").read_bytes().decode(errors="replace"):
                out.append(int(p.name))
        except OSError:
            continue
    return out


def _kill(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _start_head(tmp_path: Path, attempt: int) -> tuple[subprocess.Popen, str, dict, int, int, Path]:
    """`ray start --head` on 127.0.0.1 with fresh free ports; returns (process, temp dir, env, GCS port,
    dashboard port, log path)."""
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must stay < 107 bytes
    (gcs, dash, agent_http, agent_grpc, renv, metrics, client, node_mgr, obj_mgr) = free_ports(9)
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        # The job's entrypoint (`stridelab`) and Ray's workers come from this venv.
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--runtime-env-agent-port={renv}", f"--metrics-export-port={metrics}",
           f"--ray-client-server-port={client}", f"--node-manager-port={node_mgr}",
           f"--object-manager-port={obj_mgr}", "--num-cpus=2", f"--temp-dir={temp_dir}"]
    log_path = tmp_path / f"head-{attempt}.log"
    with open(log_path, "wb") as log:
        head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return head, temp_dir, env, gcs, dash, log_path


def _stop_head(head: subprocess.Popen, temp_dir: str, tmp_path: Path) -> None:
    """This head only: its process group (ray start --block and what it spawned), then anything left that
    names its temp dir (workers, agents) or this test's tmp dir (the job's driver)."""
    for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            pass
        _kill(_pids_mentioning(temp_dir) + _pids_mentioning(str(tmp_path)), sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and (head.poll() is None or _pids_mentioning(temp_dir)):
            time.sleep(0.5)
        if head.poll() is not None and not _pids_mentioning(temp_dir):
            break
    head.wait(timeout=10)
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head on 127.0.0.1 with the dashboard (the Jobs API lives there); yields (dashboard URL, env, GCS port).

    Its ports are picked free and closed before Ray binds them, so another process can take one in between:
    a head that exits or never serves its Jobs API is stopped and started again on fresh ports (3 tries)."""
    failures = []
    for attempt in range(3):
        head, temp_dir, env, gcs, dash, log_path = _start_head(tmp_path, attempt)
        url = f"http://127.0.0.1:{dash}"
        ok, why = _wait_for_job_api(url, env, head, log_path)
        if ok:
            break
        failures.append(why)
        _stop_head(head, temp_dir, tmp_path)
    else:
        pytest.fail("the Ray head did not come up in 3 tries:\n" + "\n---\n".join(failures))
    try:
        yield url, env, gcs
    finally:
        _stop_head(head, temp_dir, tmp_path)


def _wait_for_job_api(url: str, env: dict, head: subprocess.Popen, log: Path, timeout: float = 120.0) -> tuple[bool, str]:
    """Until `ray job list` answers (dashboard, its job module and the head's agent are up): (True, "");
    (False, why) when the head exits first or the API does not answer in `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if head.poll() is not None:
            return False, f"ray start exited {head.returncode}:\n{log.read_text(errors='replace')[-3000:]}"
        try:
            r = subprocess.run([str(RAY), "job", "list", "--address", url], env=env, capture_output=True, text=True,
                               timeout=60)
        except subprocess.TimeoutExpired:
            continue
        if r.returncode == 0:
            return True, ""
        last = (r.stderr or r.stdout)[-500:]
        time.sleep(2)
    return False, f"the Ray Jobs API at {url} did not come up in {timeout:.0f} s: {last}"


def test_ray_job_submit_runs_a_sweep_that_lands_in_mlflow(ray_head, tmp_path):
    from mlflow.tracking import MlflowClient

    url, env, gcs_port = ray_head
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    runtime_env = {"excludes": [".venv", ".git", "results", "mlruns", "mlartifacts", "*.db", "runs"]}
    trials = 5
    entry = (
        'python -c "import os, sys; print(\'job python:\', sys.executable); print(\'job RAY_ADDRESS:\', '
        'os.environ.get(\'RAY_ADDRESS\'))" && '
        f"stridelab sweep --ray-address auto --model gmm:ring8 --nfe 4 --trials {trials} --parallel 2 --actors 2 "
        "--num-seeds 16 --holdout-seeds 8 --teacher-nfe 50 --schedules uniform,logsnr --no-holdout-fid "
        f"--study-name rehearsal --storage {tmp_path}/optuna.journal --tracking-uri {tracking} "
        f"--experiment rehearsal --out-dir {tmp_path}/results --seed 0"
    )
    t0 = time.monotonic()
    # Without --no-wait the CLI follows the job's log and returns when it ends; exit 0 only on SUCCEEDED.
    r = subprocess.run(
        [str(RAY), "job", "submit", "--address", url, "--submission-id", "stridelab-rehearsal",
         "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--", "bash", "-c", entry],
        env=env, capture_output=True, text=True, timeout=480, cwd=tmp_path,
    )
    elapsed = time.monotonic() - t0
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    status = subprocess.run([str(RAY), "job", "status", "--address", url, "stridelab-rehearsal"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert "Job 'stridelab-rehearsal' succeeded" in status.stdout + status.stderr, status.stdout + status.stderr
    (tmp_path / "job.log").write_text(out)
    # The job ran on this head (Ray sets RAY_ADDRESS for the job; --ray-address auto reads it), with this venv.
    assert f"job python: {VENV_BIN}" in out, out[-4000:]
    # (the address is the node's own IP, not 127.0.0.1, but the port is this head's GCS port)
    assert re.search(rf"job RAY_ADDRESS: \S+:{gcs_port}\n", out), out[-4000:]

    client = MlflowClient(tracking_uri=tracking)
    exp = client.get_experiment_by_name("rehearsal")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [x for x in runs if "mlflow.parentRunId" not in x.data.tags]
    assert len(parents) == 1, [x.info.run_name for x in runs]
    parent = parents[0]
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED"
    # each child run ends with the status its Optuna trial's state maps to (COMPLETE -> FINISHED, PRUNED ->
    # FINISHED with tag state PRUNED, FAIL -> FAILED), read from the job's own journal
    import optuna

    from search.study import make_storage

    study = optuna.load_study(study_name="rehearsal", storage=make_storage(tmp_path / "optuna.journal"))
    state_of = {t.number: t.state.name for t in study.trials}
    assert len(children) == trials and sorted(int(c.data.tags["trial"]) for c in children) == sorted(state_of)
    mlflow_status = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED"}
    for c in children:
        state = state_of[int(c.data.tags["trial"])]
        assert (c.data.tags["state"], c.info.status) == (state, mlflow_status[state]), c.data.tags
    assert "COMPLETE" in state_of.values()
    assert any(k.startswith("holdout_recon") for k in parent.data.metrics), sorted(parent.data.metrics)
    print(f"ray job submit -> SUCCEEDED in {elapsed:.0f} s")
