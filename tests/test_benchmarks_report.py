"""benchmarks/run_all.py renders its report from raw figures (`--from-json`): no measuring needed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import run_all  # noqa: E402


def _rows(nfe, learned_fid, uniform_fid):
    return [
        {"schedule": "learned", "nfe": str(nfe), "holdout_recon": 1e-3, "x_best_baseline": 0.5, "holdout_fid": learned_fid,
         "fid_x_best_baseline": learned_fid / uniform_fid, "fid_gap_x_best_baseline": 0.4, "tuning_recon": 1.1e-3,
         "timesteps": "906 785 667 534 425 321 223 154 75 17"},
        {"schedule": "uniform", "nfe": str(nfe), "holdout_recon": 2e-3, "x_best_baseline": 1.0, "holdout_fid": uniform_fid,
         "fid_x_best_baseline": 1.0, "fid_gap_x_best_baseline": 1.0, "tuning_recon": 2.1e-3,
         "timesteps": "900 800 700 600 500 400 300 200 100 0"},
        {"schedule": "teacher (250-step DDIM)", "nfe": "250", "holdout_recon": 0.0, "x_best_baseline": 0.0,
         "holdout_fid": 2.0, "fid_x_best_baseline": 2.0 / uniform_fid, "fid_gap_x_best_baseline": 0.0,
         "tuning_recon": "", "timesteps": " ".join(str(t) for t in range(996, -1, -4))},
    ]


def test_report_from_json(tmp_path):
    cost = {"trials": 150, "states": {"COMPLETE": 64, "PRUNED": 86}, "search_s": 200.0, "reach_trials": 62,
            "reach_s": 280.0, "best_is": "learned (trial 129)", "overhead": 1.01, "batches_used": 35, "batches": 35}
    sweeps = [{"nfe": n, "cmd": f"stridelab sweep --nfe {n}", "wall_s": 400.0, "peak_rss": 5 * 2**30,
               "peak_pss": 3 * 2**30, "driver_rss": 2**30, "peak_procs": 12, "rows": _rows(n, lf, uf), "cost": cost}
              for n, lf, uf in ((10, 3.4, 3.6), (20, 2.5, 2.6))]
    raw = {"machine": {"cpu": "CPU", "cores": 2, "ram_gib": 24.0, "torch": "t", "ray": "r", "python": "3",
                       "os": "Linux", "load_avg": [0.0, 0.0, 0.0], "date": "2026-11-23"},
           "sampler": {"model": "bundled:digits", "batch": 256, "nfe": 10, "reps": 5, "overhead": 1.0,
                       "ours_over_diffusers": 0.99, "raw_s": 1.5, "math_fraction": 3e-4},
           "pool": None, "sweeps": sweeps}
    src = tmp_path / "raw.json"
    src.write_text(json.dumps(raw))
    out = tmp_path / "B.md"
    assert run_all.main(["--from-json", str(src), "--out", str(out), "--nfe", "10,20"]) == 0
    text = out.read_text()
    assert "| 906 785 667 534 425 321 223 154 75 17 |" in text  # whole numbers, not split into digits
    assert "| 996 992 988 ... 8 4 0 |" in text  # the teacher's 250 steps shortened
    assert "| 10 | 0.001 | uniform | 0.002 | **0.500** |" in text  # the teacher (recon 0) is never the best baseline
    assert "learned NFE 10 at least as good in FID as uniform NFE 20" in text and "3.4 vs 2.6: **not met**" in text
    assert "0.030%" in text and "--from-json" not in text


def test_solver_schedules_section_from_rows(tmp_path, monkeypatch):
    """bench_solver_schedules: per solver, learned vs its own best baseline; per cell, the best learned pair vs
    the best default pair (any solver's own default, from the reference rows), rendered between markers."""
    import bench_solver_schedules as b

    def run(solver, learned, own_best, other_default):
        rows = [
            {"schedule": "learned", "solver": solver, "holdout_recon": str(learned), "holdout_recon_sem": "1e-5",
             "holdout_fid": "2.0", "timesteps": "900 500 100"},
            {"schedule": "quadratic", "solver": solver, "holdout_recon": str(own_best), "holdout_fid": "3.0"},
            {"schedule": "default", "solver": solver, "holdout_recon": str(own_best * 2), "holdout_fid": "4.0"},
            {"schedule": "euler default", "solver": "euler", "holdout_recon": str(other_default), "holdout_fid": "5.0"},
            {"schedule": "teacher (250-step DDIM)", "solver": "ddim", "holdout_recon": "0.0"},
        ]
        return {"model": "m", "solver": solver, "nfe": 10, "wall_s": 1.0, "rows": rows}

    summary = b.summarise([run("ddim", 2e-3, 3e-3, 1e-3), run("unipc", 4e-4, 1e-3, 1e-3)])
    assert summary[0]["best_baseline"] == "quadratic" and summary[0]["best_default_pair"] == "euler default"
    text = b.render(summary, {"date": "2026-12-02", "machine": "x", "mode": "full", "flags": ["--trials", "8"],
                              "wall_min": 1.0})
    assert "| m | 10 | unipc | 0.0004 +- 1e-05 | quadratic 0.001 | **0.400** |" in text
    assert "| m | 10 | unipc | 0.0004 | euler default | 0.001 | **0.400** |" in text
    doc = tmp_path / "B.md"
    doc.write_text(f"# head\n\n{b.BEGIN}\nold\n{b.END}\ntail\n")
    monkeypatch.setattr(b, "OUT", doc)
    b.write_section(text)
    out = doc.read_text()
    assert out.startswith("# head") and out.rstrip().endswith("tail") and "old" not in out and out.count(b.BEGIN) == 1


def test_sample_scale_section_from_runs(tmp_path, monkeypatch):
    """bench_sample_scale: the RSS ratio largest / smallest and its verdict, rendered between markers."""
    import bench_sample_scale as b

    runs = [{"samples": n, "wall_s": w, "samples_per_s": n / w, "driver_peak_rss_mib": rss, "row_groups": g,
             "parquet_mib": n / 2000, "cmd": "stridelab sample"}
            for n, w, rss, g in ((1000, 20.0, 500.0, 1), (10000, 65.0, 520.0, 1), (100000, 515.0, 540.0, 7))]
    summary = b.summarize(runs)
    assert summary["rss_ratio"] == 540.0 / 500.0 and summary["marginal_samples_per_s"] == 90000 / 450.0
    meta = {"date": "2026-12-02", "machine": "x", "model": "bundled:digits", "nfe": 10, "actors": 2,
            "batch_size": 256, "load": "3.0", "argv": "", "notes": ["10^5 not run"]}
    text = b.section(meta, runs, summary)
    assert "| 100,000 | 515.0 | 194 | 540 | 7 | 50.0 |" in text and "**1.080** (target <= 1.2: met)" in text
    assert "10^5 not run" in text
    summary["rss_ratio"] = 2.0
    assert "not met" in b.section(meta, runs, summary)
    doc = tmp_path / "B.md"
    doc.write_text(f"# head\n\n{b.BEGIN}\nold\n{b.END}\ntail\n")
    monkeypatch.setattr(b, "OUT", doc)
    b.write_section(text)
    out = doc.read_text()
    assert out.startswith("# head") and out.rstrip().endswith("tail") and "old" not in out and out.count(b.BEGIN) == 1
