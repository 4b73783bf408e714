"""benchmarks/bench_inversion.py: a real quick run (a `sweep --objective inversion` subprocess on gmm:ring8 and the
asymmetric round trips in process) writes its section; the report reads its figures; `refine` keeps the decoder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_inversion as b  # noqa: E402


@pytest.mark.parametrize("ts", [[900, 500, 100], [935, 841, 753, 31], [999, 600, 0], [3, 1]])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_refine_contains_the_decoder_and_starts_where_it_does(ts, k):
    enc = b.refine(ts, k)
    assert enc == sorted(set(enc), reverse=True) and enc[0] == ts[0]
    assert set(ts) <= set(enc)
    if k == 1:
        assert enc == ts
    else:
        assert len(enc) > len(ts)


def test_quick_run_writes_the_section(tmp_path):
    out = tmp_path / "B.md"
    out.write_text("# Benchmarks\n\nkept\n")
    assert b.main(["--quick", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n") and b.BEGIN in text and b.END in text
    row = next(line for line in text.splitlines() if line.startswith("| gmm:ring8 | 5 |"))
    cells = [c.strip() for c in row.split("|")]
    ratio = float(cells[5].split()[0].strip("*"))
    lo, hi = (float(v) for v in cells[5].split("(")[1].rstrip(")").split("-"))
    assert 0 < lo <= ratio <= hi
    assert cells[6] in ("met", "met (point), interval crosses", "**not met**")
    asym = [line for line in text.splitlines() if line.startswith("| gmm:ring8 | 5 |") and line.split("|")[4].strip().isdigit()]
    assert len(asym) == len(b.ENCODE_FACTORS)
    pair = [line for line in text.splitlines() if line.startswith("| gmm:ring8 | 5 |") and line.count("|") == 9]
    assert len(pair) == 1 and pair[0].split("|")[3].strip() in ("yes", "no"), pair  # the sweep's joint pair, kept or not


def test_report_from_json_says_not_met_plainly(tmp_path):
    rows = [{"schedule": "learned", "solver": "ddim", "holdout_inversion": "3e-3", "inv_x_best_baseline": "0.75",
             "inv_x_best_baseline_lo": "0.7", "inv_x_best_baseline_hi": "0.8", "timesteps": "900 500 100"},
            {"schedule": "uniform", "solver": "ddim", "holdout_inversion": "4e-3", "inv_x_best_baseline": "1.0",
             "timesteps": "900 450 0"},
            {"schedule": "karras", "solver": "ddim", "holdout_inversion": "8e-3", "inv_x_best_baseline": "2.0",
             "timesteps": "999 300 0"}]
    runs = [{"model": "bundled:digits", "nfe": n, "wall_s": 1.0, "rows": rows} for n in (10, 20)]
    runs[1] = {**runs[1], "rows": [{**r, "holdout_inversion": str(float(r["holdout_inversion"]) / 2)} for r in rows]}
    meta = {"date": "2026-12-02", "mode": "full", "machine": "m", "cmd": "c", "wall_min": 1.0}
    src = tmp_path / "raw.json"
    src.write_text(json.dumps({"meta": meta, "runs": runs}))
    out = tmp_path / "B.md"
    assert b.main(["--from-json", str(src), "--out", str(out)]) == 0
    text = out.read_text()
    assert "| bundled:digits | 10 | 0.003 | uniform 0.004 | **0.750** (0.700-0.800) | **not met** |" in text
    assert "best baseline 2.00x, learned 2.00x" in text and "about 2x" in text
