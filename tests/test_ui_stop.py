"""`stridelab ui` stops everything it started (mlflow server, uvicorn, MLflow's huey job consumers), however it
is stopped: SIGINT or SIGTERM to its PID alone (not its process group), or SIGKILL of it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.slow  # the server takes ~15 s to answer /health on a shared 2-core box


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _procs() -> dict[int, tuple[str, int, int]]:
    """pid -> (state, ppid, session id) from /proc/*/stat."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    st = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            out[int(d)] = (st[0], int(st[1]), int(st[3]))
    return out


def _in_sessions(sids: set[int]) -> dict[int, str]:
    return {pid: state for pid, (state, _, sid) in _procs().items() if sid in sids}


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.read().strip() == b"OK"
    except OSError:
        return False


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 0), (signal.SIGTERM, 128 + signal.SIGTERM),
                                       (signal.SIGKILL, -signal.SIGKILL)])
def test_ui_stops_everything_it_started(tmp_path, sig, code):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "MLFLOW_TRACKING_URI": ""}
    log = (tmp_path / "ui.log").open("wb")
    # its own session, so that everything it starts can be found (and cleaned up here if the test fails)
    ui = subprocess.Popen([sys.executable, "-m", "jobs.cli", "ui", "--port", str(port),
                           "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
                          cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    sids = {ui.pid}
    try:
        deadline = time.monotonic() + 180
        while not _healthy(port):
            assert ui.poll() is None, (tmp_path / "ui.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.5)
        sids |= {pid for pid, (_, ppid, _) in _procs().items() if ppid == ui.pid}  # the keeper's own session
        started = _in_sessions(sids)
        assert len(started) >= 4, started  # stridelab, keeper, mlflow server, uvicorn (+ huey consumers)

        t0 = time.monotonic()
        os.kill(ui.pid, sig)  # its PID only, not its group
        assert ui.wait(30) == code
        left = _in_sessions(sids)
        while left and time.monotonic() - t0 < 15:  # after SIGKILL the keeper works on its own
            time.sleep(0.2)
            left = _in_sessions(sids)
        assert time.monotonic() - t0 < 15
        assert not left, f"left running: {left} of {started}"
        assert not _port_open(port)
    finally:
        for sid in sids:
            try:
                os.killpg(sid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if ui.poll() is None:
            ui.wait(5)
        log.close()
