"""benchmarks/bench_methods.py --quick end to end on the analytic gmm:ring8: real sweeps, a real SamplerPool."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_methods as b  # noqa: E402

from pipeline.errors import StridelabError  # noqa: E402
from search.sweep.config import SweepConfig  # noqa: E402


def test_quick_run_writes_every_row_and_column(tmp_path, monkeypatch, capsys):
    replaced = []
    real_replace = os.replace

    def spy(src, dst):  # the JSON and the report reach their names by one rename of a finished temp file
        replaced.append((Path(src), Path(dst), json.loads(Path(src).read_text()) if str(dst).endswith(".json") else None))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    doc = tmp_path / "B.md"
    doc.write_text(f"# head\n\n{b.BEGIN}\nold\n{b.END}\ntail\n")
    out = tmp_path / "methods.json"
    assert b.main(["--quick", "--solvers", "ddim,dpmsolver++2m", "--json", str(out), "--doc", str(doc),
                   "--trials", "12", "--holdout-seeds", "16"]) == 0

    raw = json.loads(out.read_text())
    mine = [(src, dst, body) for src, dst, body in replaced if dst in (out, doc)]  # the sweeps' own files aside
    assert [d for _, d, _ in mine] == [out, doc]
    assert mine[0][0].parent == out.parent and mine[0][0].name.startswith(".") and mine[0][2] == raw
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    rows = raw["rows"]
    methods = ["default", "uniform", "linspace", "trailing", "quadratic", "karras", "logsnr", "time_quadratic", "beta",
               "ays", *b.SEARCHED]
    for solver in ("ddim", "dpmsolver++2m"):
        cell = [r for r in rows if r["solver"] == solver and r["nfe"] == 5]
        assert [r["method"] for r in cell] == methods
        for r in cell:
            if r.get("note"):  # only a gradient method may be refused, and only where the library refuses it
                assert r["method"] in ("gradient", "dp+gradient") and r["note"].startswith("not supported")
                continue
            assert r["holdout_recon"] > 0 and r["x_lo"] <= r["x_best_baseline"] <= r["x_hi"]
            assert r["holdout_fid"] is not None and r["timesteps"]
            if r["kind"] == "searched":
                assert r["wall_s"] > 0 and r["model_evals"] > 0
        best = min((r for r in cell if r["kind"] == "baseline"), key=lambda r: r["holdout_recon"])
        assert best["x_best_baseline"] == 1.0
    ddim = {r["method"]: r for r in rows if r["solver"] == "ddim"}
    assert not ddim["gradient"].get("note") and not ddim["dp+gradient"].get("note")
    # the gradient from dp runs the dp placement and then the gradient: more evaluations than dp alone
    assert ddim["dp+gradient"]["model_evals"] > ddim["dp"]["model_evals"]

    def gap(a, b):  # L1 distance of two rows' timesteps
        return sum(abs(int(x) - int(y)) for x, y in zip(ddim[a]["timesteps"].split(), ddim[b]["timesteps"].split()))

    assert gap("dp+gradient", "dp") < gap("gradient", "dp")  # three Adam steps stay near where they started

    text = doc.read_text()
    assert text.startswith("# head") and text.rstrip().endswith("tail") and "\nold\n" not in text
    header = "| solver | NFE | method | held-out recon | x best baseline [95%] | FID | wall s | model evals |"
    assert header in text and text.count("| ddim | 5 |") == len(methods)
    assert "verdict: most held-out quality per wall-minute:" in capsys.readouterr().out


def test_gradient_support_is_read_from_the_library():
    """The bench marks a cell "not supported" exactly when SweepConfig refuses it; grad_init dp needs dp."""
    base = SweepConfig(model="gmm:ring8", nfe=5, trials=14, num_seeds=8)
    cfg = b.method_config(base, "dp+gradient")
    assert cfg.grad_init == "dp" and cfg.baselines == ("dp",) and cfg.warm_trials == 2
    with pytest.raises(StridelabError, match="grad_init"):
        SweepConfig(model="gmm:ring8", nfe=5, trials=4, num_seeds=8, method="gradient", grad_init="dp",
                    baselines=("uniform",))
    with pytest.raises(StridelabError, match="grad_init"):
        SweepConfig(model="gmm:ring8", nfe=5, trials=4, num_seeds=8, method="gradient", grad_init="karras",
                    baselines=("dp",))


def test_verdict_names_the_fastest_gain_and_the_interval():
    def row(method, x, lo, hi, wall):
        return {"solver": "ddim", "nfe": 5, "method": method, "kind": "searched", "x_best_baseline": x, "x_lo": lo,
                "x_hi": hi, "wall_s": wall}

    rows = [{"solver": "ddim", "nfe": 5, "method": "uniform", "kind": "baseline", "x_best_baseline": 1.0,
             "x_lo": 1.0, "x_hi": 1.0, "wall_s": 0.0},
            row("dp", 0.8, 0.7, 0.9, 6.0), row("tpe+polish", 0.5, 0.3, 1.1, 60.0)]
    v = b.verdict(rows)
    assert "per wall-minute: dp (it removes 20%" in v and "dp in 1 of 1" in v and "tpe+polish in" not in v
    rows[1].update(x_best_baseline=1.2, x_lo=1.1, x_hi=1.3)
    assert "nothing beats the strongest baseline" in b.verdict(rows) and "per wall-minute: tpe+polish" in b.verdict(rows)


def test_merge_keeps_each_runs_header_and_replaces_cells_by_the_later_run(tmp_path):
    def run(nfe, date, value):
        meta = {"date": date, "mode": "full", "machine": "m", "load": "1", "wall_min": 2.0, "budget": "--trials 40",
                "model": "bundled:digits", "nfes": str(nfe), "num_seeds": 64, "holdout_seeds": 256, "teacher_nfe": 250}
        rows = [{"solver": s, "nfe": nfe, "method": "uniform", "kind": "baseline", "holdout_recon": value,
                 "x_best_baseline": 1.0, "x_lo": 1.0, "x_hi": 1.0, "holdout_fid": 1.0, "wall_s": 0.0, "model_evals": 0}
                for s in ("ddim", "dpmsolver++2m")]
        return {"meta": meta, "rows": rows}

    raw = b.merge([run(10, "2026-12-02", 1.0), run(5, "2026-12-03", 2.0), run(5, "2026-12-04", 3.0)])
    assert [(r["solver"], r["nfe"], r["holdout_recon"]) for r in raw["rows"]] == [
        ("ddim", 5, 3.0), ("ddim", 10, 1.0), ("dpmsolver++2m", 5, 3.0), ("dpmsolver++2m", 10, 1.0)]
    assert raw["meta"]["nfes"] == "5,10"
    text = b.render(raw["rows"], raw["meta"])
    assert "NFE 10: measured 2026-12-02" in text and "NFE 5: measured 2026-12-04" in text
    other = run(5, "2026-12-05", 1.0)
    other["meta"]["budget"] = "--trials 10"
    with pytest.raises(SystemExit, match="different budgets"):
        b.merge([run(10, "2026-12-02", 1.0), other])
