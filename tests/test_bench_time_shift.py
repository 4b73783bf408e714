"""benchmarks/bench_time_shift.py --quick end to end on the analytic gmm:ring8: every variant, real gradients."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_time_shift as b  # noqa: E402


def test_quick_run_scores_every_variant_on_held_out_seeds(tmp_path):
    doc = tmp_path / "B.md"
    doc.write_text(f"# head\n\n{b.BEGIN}\nold\n{b.END}\ntail\n")
    out = tmp_path / "ts.json"
    assert b.main(["--quick", "--solvers", "ddim", "--json", str(out), "--doc", str(doc)]) == 0
    raw = json.loads(out.read_text())
    (cell,) = raw["cells"]
    rows = {r["variant"]: r for r in cell["rows"]}
    assert set(rows) == set(b.VARIANTS)
    assert rows["placement"]["shift"] is None and "x_without_shift" not in rows["placement"]
    for v in ("placement+shift", "baseline+shift"):
        assert len(rows[v]["shift"]) == 5 and any(abs(s) > 1e-3 for s in rows[v]["shift"])
        assert rows[v]["x_ws_lo"] <= rows[v]["x_without_shift"] <= rows[v]["x_ws_hi"]
    # the fixed-steps variant keeps the steps of the baseline it was started from (picked on the tuning seeds)
    assert rows["baseline+shift"]["timesteps"] == [int(t) for t in rows["baseline+shift"]["timesteps"]]
    assert rows["baseline+shift"]["start"] == cell["tuning_best"]
    assert rows["placement"]["best_baseline_recon"] == min(cell["baselines"].values())
    text = doc.read_text()
    assert text.startswith("# head") and text.endswith("tail\n") and "old" not in text
    assert "| ddim | 5 | baseline+shift" in text and "verdict: the shift" in text
    # re-rendering from the saved figures gives the same section
    doc2 = tmp_path / "C.md"
    doc2.write_text("")
    assert b.main(["--from-json", str(out), "--doc", str(doc2)]) == 0
    assert b.render(raw) in doc2.read_text()
