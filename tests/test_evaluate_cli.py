"""`stridelab evaluate`: one table for all schedules on the same seeds, the same numbers in-process and on
Ray actors, and one-line errors (exit 2, no output file) for bad input."""

from __future__ import annotations

import csv
import math
import warnings

import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from pipeline.models.load import load_model
from pipeline.core.schedules import make_schedule

BASE = ["evaluate", "--model", "gmm:ring8", "--num-seeds", "24", "--teacher-nfe", "40", "--nfe", "3,6"]


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_in_process_and_actors_give_the_same_table(ray_local, tmp_path, capsys):
    sched = make_schedule("karras", 4, load_model("gmm:ring8").alphas_cumprod)
    js = tmp_path / "mine.json"
    sched.save(js)
    common = BASE + ["--schedules", f"uniform,quadratic,{js}"]
    assert main(common + ["--out", str(tmp_path / "a.csv")]) == 0
    table = capsys.readouterr().out
    assert "schedule" in table and "recon" in table and "inversion" in table
    assert main(common + ["--actors", "2", "--out", str(tmp_path / "b.parquet")]) == 0
    a = _csv(tmp_path / "a.csv")
    b = pq.read_table(tmp_path / "b.parquet").to_pylist()
    # --nfe is the budget: the 4-step file is log-sigma interpolated to the 3 and 6 steps that fit (column how).
    assert [(r["schedule"], int(r["nfe"]), int(r["steps"])) for r in a] == [
        ("uniform", 3, 3), ("quadratic", 3, 3), (str(js), 3, 3), ("uniform", 6, 6), ("quadratic", 6, 6), (str(js), 6, 6)]
    assert a[2]["how"] == "log-sigma interpolated 4->3 steps" and a[0]["how"] == "as is"
    for ra, rb in zip(a, b):
        assert float(ra["recon"]) == rb["recon"] and float(ra["inversion"]) == rb["inversion"]  # repr round-trips
        assert ra["timesteps"] == rb["timesteps"]
    assert float(a[0]["recon"]) > float(a[3]["recon"]) > 0  # more steps, closer to the teacher
    # Only a file (no --nfe): it runs as is, at its own step count; same seeds, so the numbers repeat.
    assert main(BASE[:BASE.index("--nfe")] + BASE[BASE.index("--nfe") + 2:] + ["--schedules", f"{js},{js}",
                "--out", str(tmp_path / "c.csv")]) == 0
    c = _csv(tmp_path / "c.csv")
    assert [(int(r["nfe"]), r["how"]) for r in c] == [(4, "as is"), (4, "as is")] and c[0]["recon"] == c[1]["recon"]


def test_fid_and_kid_columns(tmp_path, capsys):
    out = tmp_path / "t.csv"
    assert main(BASE + ["--schedules", "uniform", "--metrics", "recon,fid,kid", "--fid-features", "pixels",
                        "--fid-ref", "model", "--out", str(out)]) == 0
    rows = _csv(out)
    assert len(rows) == 2 and "inversion" not in rows[0]
    for r in rows:
        assert math.isfinite(float(r["fid"])) and float(r["fid"]) > 0 and math.isfinite(float(r["kid"]))
    assert "fid" in capsys.readouterr().out


@pytest.mark.parametrize("bad, needle", [
    (["--actors", "-1"], "--actors"),
    (["--nfe", "0"], "nfe"),
    (["--schedules", "uniform,nope"], "unknown schedule"),
    (["--metrics", "recon,bogus"], "unknown metric"),
    (["--num-seeds", "0"], "--num-seeds"),
    (["--fid-ref", "cleanfid:x", "--metrics", "fid"], "FID reference"),
])
def test_bad_input_is_one_line_exit_2_and_no_file(tmp_path, cli_stderr, bad, needle):
    out = tmp_path / "t.csv"
    argv = BASE + ["--schedules", "uniform", "--out", str(out)]
    for i in range(0, len(bad), 2):  # later flags win in argparse; replace to keep argv readable
        argv += bad[i : i + 2]
    assert main(argv) == 2
    err = cli_stderr()
    assert len(err) == 1 and needle in err[0] and err[0].startswith("stridelab evaluate: error:"), err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_schedule_learned_on_another_model_warns_and_the_output_names_the_model(tmp_path, capsys):
    """gmm:ring8 and bundled:digits share linear betas, so the alphas_cumprod hash passes: the recorded model
    id is what tells them apart. The warning names both; the log and the table header name the model run."""
    from pipeline.interop.apply import alphas_cumprod_sha256
    from search.export import export_dict, write_export

    abar = load_model("gmm:ring8").alphas_cumprod
    sched = make_schedule("karras", 4, abar)
    js = tmp_path / "digits.json"
    write_export(js, export_dict(sched, model="bundled:digits", sigmas=sched.sigmas(abar).tolist(),
                                 alphas_hash=alphas_cumprod_sha256(abar)))
    argv = [a for a in BASE if a not in ("--nfe", "3,6")] + ["--schedules", str(js), "--metrics", "recon"]
    with pytest.warns(UserWarning, match="learned on model bundled:digits, running it on gmm:ring8"):
        assert main(argv) == 0
    out = capsys.readouterr().out
    assert "DDIM of gmm:ring8" in out and "model gmm:ring8 (T = 1000)" in out
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same file on the model it records: no warning
        write_export(js, export_dict(sched, model="gmm:ring8", sigmas=sched.sigmas(abar).tolist(),
                                     alphas_hash=alphas_cumprod_sha256(abar)))
        assert main(argv) == 0
