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
