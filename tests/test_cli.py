"""The `stridelab` command: help, the core subcommands, and one-line errors for bad input."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from jobs.cli import main


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


SUBCOMMANDS = ["schedules", "evaluate", "train", "train digits", "train features", "sample", "invert", "interpolate",
               "sweep", "export", "ui",
               "report", "report digits"]


def test_help_lists_subcommands(capsys):
    from jobs.cli import COMMAND_MODULES

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    top = {c.split()[0] for c in SUBCOMMANDS}
    assert len(top) == len(COMMAND_MODULES)
    for cmd in top:
        assert f"    {cmd}" in out
    assert "stridelab sweep " in out and "bundled:digits" in out  # the main job


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_every_subcommand_has_help(capsys, cmd):
    with pytest.raises(SystemExit) as e:
        main([*cmd.split(), "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: stridelab {cmd}") and "--help" in out


def test_schedules_prints_and_saves(tmp_path, capsys):
    out_file = tmp_path / "k.json"
    assert main(["schedules", "--model", "gmm:ring8", "--nfe", "6", "--schedules", "karras", "--out", str(out_file)]) == 0
    from pipeline.core.schedules import Schedule

    s = Schedule.load(out_file)
    assert s.nfe == 6 and s.name == "karras"
    assert "karras" in capsys.readouterr().out


def test_evaluate_writes_table_with_every_schedule(tmp_path):
    out = tmp_path / "t.csv"
    assert main(["evaluate", "--model", "gmm:ring8", "--schedules", "uniform,karras", "--nfe", "4,8",
                 "--num-seeds", "32", "--teacher-nfe", "200", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert {(r["schedule"], r["nfe"]) for r in rows} == {("uniform", "4"), ("karras", "4"), ("uniform", "8"), ("karras", "8")}
    assert all(float(r["recon"]) > 0 for r in rows)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["evaluate", "--model", "gmm:ring8", "--nfe", "0"], "nfe must be an integer in [1, 1000]"),
        (["evaluate", "--model", "gmm:ring8", "--nfe", "1001"], "nfe must be an integer"),
        (["evaluate", "--model", "gmm:ring8", "--schedules", "cosine"], "unknown schedule 'cosine'"),
        (["evaluate", "--model", "gmm:ring8", "--schedules", "missing.json"], "schedule file not found"),
        (["evaluate", "--model", "gmm:ring8", "--nfe", "a,b"], "expected comma-separated integers"),
        (["evaluate", "--model", "gmm:ring8", "--num-seeds", "0"], "--num-seeds must be >= 1"),
        (["evaluate", "--model", "gmm:ring8", "--out", "table.txt", "--num-seeds", "2", "--nfe", "2", "--schedules", "uniform",
          "--teacher-nfe", "4"], "must end in .csv or .parquet"),
        (["schedules", "--model", "gmm:ring8", "--nfe", "5", "--out", "x.json"], "exactly one name"),
        (["nonsense"], "invalid choice"),
    ],
)
def test_bad_input_one_line_nonzero_no_traceback_no_output(tmp_path, args, needle):
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    # Ours print exactly one line; argparse prints its usage (wrapped lines indented), then one error line.
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "%|" not in ln]
    if lines[0].startswith("usage:"):
        lines = [ln for ln in lines[1:] if not ln.startswith(" ")]
    assert len(lines) == 1, r.stderr
    assert "error:" in lines[-1]
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_atomic_write_leaves_no_temp_file_and_normal_permissions(tmp_path):
    import os

    from pipeline.io.files import atomic_write_text

    p = atomic_write_text(tmp_path / "a.json", "{}\n")
    assert p.read_text() == "{}\n"
    assert [f.name for f in tmp_path.iterdir()] == ["a.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask


def test_cli_stderr_fixture_drops_only_ray_forwarded_lines(cli_stderr):
    import sys

    print("\x1b[36m(pid=gcs_server)\x1b[0m [2026-11-23 16:30:53,390 E 1 1] Socket closed", file=sys.stderr)
    print("(SamplerWorker pid=42) warming up", file=sys.stderr)
    print("(raylet) something", file=sys.stderr)
    print("stridelab sample: error: --actors must be >= 0 (pid=1 is not a flag)", file=sys.stderr)
    assert cli_stderr() == ["stridelab sample: error: --actors must be >= 0 (pid=1 is not a flag)"]


BUGGY = """
import sys
import pipeline.core.schedules as schedules
def make_schedule(*a, **k):
    raise {exc}("a bug deep inside numpy")
schedules.make_schedule = make_schedule
from jobs.cli import main
sys.exit(main(["schedules", "--model", "gmm:ring8", "--nfe", "5", "--schedules", "uniform"]))
"""


@pytest.mark.parametrize("exc", ["ValueError", "RuntimeError"])
def test_a_bug_keeps_its_traceback(tmp_path, exc):
    """Only StridelabError is bad input: a ValueError/RuntimeError from inside a command is a bug, so it is
    not squeezed into one line (its traceback is what a bug report needs) and the exit code is not 2."""
    r = subprocess.run([sys.executable, "-c", BUGGY.format(exc=exc)], capture_output=True, text=True, cwd=tmp_path,
                       timeout=300)
    assert r.returncode not in (0, 2), r.stderr
    assert "Traceback" in r.stderr and f"{exc}: a bug deep inside numpy" in r.stderr
    assert "in make_schedule" in r.stderr  # the frame that raised


def test_stridelab_error_is_one_line_exit_2_with_flags(monkeypatch, cli_stderr):
    """A library StridelabError names parameters in backticks; the CLI prints them as its flags."""
    import pipeline.core.schedules as schedules
    from pipeline.errors import StridelabError

    def make_schedule(*a, **k):
        raise StridelabError("must be >= 2 here; see `schedules`", param="nfe")

    monkeypatch.setattr(schedules, "make_schedule", make_schedule)
    assert main(["schedules", "--model", "gmm:ring8", "--nfe", "5", "--schedules", "uniform"]) == 2
    assert cli_stderr() == ["stridelab schedules: error: --nfe must be >= 2 here; see --schedules"]


def test_library_messages_name_parameters_not_flags():
    from pipeline.errors import StridelabError

    e = StridelabError("needs Ray actors (`actors` >= 1)", param="gpus_per_actor")
    assert str(e) == "`gpus_per_actor` needs Ray actors (`actors` >= 1)" and e.param == "gpus_per_actor"
    assert e.render({"actors": "--actors"}.get) == "`gpus_per_actor` needs Ray actors (--actors >= 1)"


def test_report_digits_stale_cache_is_one_line(tmp_path, cli_stderr):
    import torch

    cache = tmp_path / "cache.pt"
    torch.save({"x0": torch.zeros(3, 1, 8, 8), "steps": 5, "wall_s": 1.0}, cache)
    rc = main(["report", "digits", "--num", "4", "--steps", "5", "--samples", str(cache),
               "--grid", str(tmp_path / "g.png"), "--json", str(tmp_path / "m.json")])
    assert rc == 2
    assert cli_stderr() == [f"stridelab report: error: {cache} holds 3 samples at 5 steps; delete it or change "
                            "--num/--steps"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.pt"]


def test_deprecated_spelling_warns_once_and_still_works(tmp_path, capsys):
    out_file = tmp_path / "k.json"
    assert main(["schedules", "--model", "gmm:ring8", "--nfe", "6", "--names", "karras", "--out", str(out_file)]) == 0
    assert capsys.readouterr().err.splitlines() == ["--names is deprecated, use --schedules"]
    assert out_file.is_file()
