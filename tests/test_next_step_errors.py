"""Errors that say the next step, as real ``python -m jobs.cli`` subprocesses: an interrupted sweep prints the
command that continues it (and that command works), a missing study lists the storage's studies, a resume with
other tuning seeds names the flags, `schedules` names the model it used. Same contract as tests/test_bad_input.py:
exit 2, one stderr line, no traceback."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
SWEEP = ("sweep", "--model", "gmm:ring8", "--nfe", "5", "--num-seeds", "16", "--holdout-seeds", "16", "--teacher-nfe",
         "50", "--schedules", "uniform,quadratic", "--no-holdout-fid", "--actors", "0", "--no-mlflow", "--polish", "0")

pytestmark = pytest.mark.timeout(900)


def cli(cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *argv], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=400)


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    """A directory holding one finished 6-trial study 'a' in results/sweep/optuna.journal."""
    d = tmp_path_factory.mktemp("studies")
    r = cli(d, *SWEEP, "--trials", "6", "--study-name", "a")
    assert r.returncode == 0, r.stderr[-3000:]
    return d


def test_missing_study_lists_the_studies_in_that_storage(study_dir):
    line = one_error_line(cli(study_dir, *SWEEP, "--trials", "6", "--study-name", "nope", "--resume"))
    assert "no study named 'nope'" in line and "it has 'a'" in line and "--study-name" in line, line


def test_resume_with_other_tuning_seeds_names_the_flags(study_dir):
    argv = list(SWEEP)
    argv[argv.index("--num-seeds") + 1] = "17"
    line = one_error_line(cli(study_dir, *argv, "--trials", "6", "--study-name", "a", "--resume"))
    assert "--seed / --num-seeds: study has [0, 16], asked [0, 17]" in line, line


def test_schedules_names_its_model(tmp_path):
    r = cli(tmp_path, "schedules", "--model", "gmm:ring8", "--nfe", "4", "--schedules", "uniform")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "gmm:ring8 (T=1000), 4 steps:", r.stdout


def test_interrupted_sweep_prints_the_command_that_continues_it(tmp_path):
    # a shell starts a background job with SIGINT ignored, and exec keeps that: the child gets the default back so
    # that Ctrl-C reaches it however pytest was started
    p = subprocess.Popen([sys.executable, "-m", "jobs.cli", *SWEEP, "--trials", "400", "--study-name", "i"], cwd=tmp_path,
                         env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in p.stdout:  # wait until trials are running, then Ctrl-C
        if line.startswith("  trials "):
            break
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-3000:]
    last = [ln for ln in err.splitlines() if ln.strip()][-1]
    prefix = "stridelab sweep: interrupted; continue with: "
    assert last.startswith(prefix), err[-3000:]
    command = shlex.split(last[len(prefix):])
    assert command[0] == "stridelab" and command[-3:] == ["--study-name", "i", "--resume"]
    # the printed command works as it is (with fewer trials, so that it ends soon)
    argv = command[1:]
    argv[argv.index("--trials") + 1] = "12"
    r = cli(tmp_path, *argv)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "study i (" in r.stdout
