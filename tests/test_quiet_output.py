"""What a command prints on stderr: by default only its own lines, none of Ray's, MLflow's or Ray Data's chatter;
with --verbose that third-party output is back. Real subprocesses of the CLI with a real local Ray (--actors 1)
and a fresh sqlite MLflow, whose first use logs "Creating initial MLflow database tables" at INFO."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# Third-party lines seen on a sweep's stderr before the policy: Ray's token-auth warning, its log lines
# ("2026-12-02 16:44:16,272\tWARNING ... -- ..."), forwarded worker lines, C++ logger lines, MLflow's INFO.
NOISE = re.compile(r"(authentication_token_setup|^\S+ \S+\t(INFO|WARNING) |^\(\w+ pid=|^\[\d{4}-\d\d-\d\d .*\] \w+\.cc:"
                   r"|INFO mlflow|Progress bars disabled)")


def cli(tmp: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    for k in ("MLFLOW_LOGGING_LEVEL", "RAY_ADDRESS"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "jobs.cli", *argv], cwd=tmp, env=env, capture_output=True,
                          text=True, timeout=400)


def sweep(tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    return cli(tmp, "sweep", "--model", "gmm:ring8", "--nfe", "5", "--trials", "8", "--polish", "0", "--num-seeds", "16",
               "--holdout-seeds", "16", "--teacher-nfe", "50", "--schedules", "uniform,quadratic", "--no-holdout-fid",
               "--actors", "1", "--study-name", "q", "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", *extra)


def test_sweep_on_ray_is_quiet_by_default_and_verbose_shows_third_party_output(tmp_path):
    (tmp_path / "quiet").mkdir()
    (tmp_path / "loud").mkdir()
    quiet = sweep(tmp_path / "quiet")
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert "evaluator: ray actor pool" in quiet.stdout  # Ray did start
    noise = [ln for ln in quiet.stderr.splitlines() if ln.strip()]
    assert noise == [], noise  # stderr is not a terminal: no bars either
    loud = sweep(tmp_path / "loud", "--verbose")
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert [ln for ln in loud.stderr.splitlines() if NOISE.search(ln)], loud.stderr[-3000:]
    assert "INFO mlflow" in loud.stderr
