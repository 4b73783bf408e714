"""benchmarks/bench_inversion_shift.py --quick end to end on the analytic gmm:ring8: both variants, real gradients
through the round trip, scored on held-out draws."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_inversion_shift as b  # noqa: E402


def test_quick_run_learns_both_variants_and_reports_them(tmp_path):
    doc = tmp_path / "B.md"
    doc.write_text(f"# head\n\n{b.BEGIN}\nOLD-SECTION\n{b.END}\ntail\n")
    out = tmp_path / "inv.json"
    assert b.main(["--quick", "--json", str(out), "--doc", str(doc)]) == 0
    raw = json.loads(out.read_text())
    (cell,) = raw["cells"]
    rows = {r["variant"]: r for r in cell["rows"]}
    assert set(rows) == set(b.VARIANTS)
    assert rows["encoder shift"]["dec"] is None and len(rows["encoder+decoder shift"]["dec"]) == 5
    for r in rows.values():
        assert len(r["enc"]) == 5 and any(abs(s) > 1e-3 for s in r["enc"])
        assert r["loss_kept"] <= r["loss_start"]  # the kept shifts are never worse on the tuning draws than none
        assert r["x_best_lo"] <= r["x_best"] <= r["x_best_hi"]
        assert r["best_baseline_holdout"] == min(cell["baselines_holdout"].values())
    text = doc.read_text()
    assert text.startswith("# head") and text.endswith("tail\n") and "OLD-SECTION" not in text
    assert "| gmm:ring8 | 5 | encoder+decoder shift |" in text and "verdict:" in text
    doc2 = tmp_path / "C.md"
    doc2.write_text("")
    assert b.main(["--from-json", str(out), "--doc", str(doc2)]) == 0
    assert b.render(raw) in doc2.read_text()


def test_zero_shift_is_the_plain_round_trip():
    # the benchmark's differentiable round trip with zero shifts is the library's integer round trip
    from pipeline.metrics.recon import inversion_errors
    from pipeline.models.load import load_model

    m = load_model("gmm:ring8")
    x0 = m.denoiser.sample_data(list(range(6))).to(torch.float64)
    ts = [900, 500, 200, 50]
    want = inversion_errors(m.denoiser, x0, ts, m.alphas_cumprod, m.to_unit)
    z = torch.zeros(4, dtype=torch.float64)
    assert torch.allclose(b.round_trip_errors(m, x0, ts), want.double(), rtol=1e-6, atol=1e-12)
    assert torch.allclose(b.round_trip_errors(m, x0, ts, z, z), want.double(), rtol=1e-4, atol=1e-10)
    assert not torch.allclose(b.round_trip_errors(m, x0, ts, z + 0.3, z), want.double(), rtol=1e-4, atol=1e-10)


def test_merge_adds_cells_and_keeps_the_other_rows(tmp_path):
    out = tmp_path / "inv.json"
    assert b.main(["--quick", "--json", str(out)]) == 0
    first = json.loads(out.read_text())
    assert b.main(["--quick", "--json", str(out), "--nfes", "3", "--variants", "encoder+decoder shift", "--merge"]) == 0
    raw = json.loads(out.read_text())
    got = [(r["nfe"], r["variant"]) for c in raw["cells"] for r in c["rows"]]
    assert got == [(3, "encoder+decoder shift"), (5, "encoder shift"), (5, "encoder+decoder shift")]
    assert [r["enc"] for r in raw["cells"][1]["rows"]] == [r["enc"] for r in first["cells"][0]["rows"]]
    assert "| gmm:ring8 | 3 | encoder+decoder shift |" in b.render(raw)
    with pytest.raises(SystemExit):
        b.main(["--quick", "--variants", "nope"])
