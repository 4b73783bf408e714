"""benchmarks/bench_engine.py on a tiny search: the same TPE search through Ray Tune's Optuna pattern and through
stridelab's resident actors, on a real local Ray (2 CPUs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_engine as b  # noqa: E402


def test_tiny_search_through_both_engines(tmp_path):
    # Its own process, as a user runs it: the bench starts its own 2-CPU Ray (Tune's trial processes import the
    # bench by name), which a Ray left running in this process by other tests would refuse.
    out, doc = tmp_path / "engine.json", tmp_path / "B.md"
    doc.write_text(f"# head\n\n{b.BEGIN}\nold\n{b.END}\ntail\n")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_engine.py"), "--quick", "--trials", "6",
                           "--num-seeds", "8", "--json", str(out), "--doc", str(doc)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    raw = json.loads(out.read_text())
    runs, s = raw["runs"], raw["summary"]
    assert set(runs) == {"ray tune", "stridelab", "stridelab (pruning)"}
    assert len(runs["ray tune"]["values"]) == 6 and len(runs["stridelab"]["values"]) == 6  # no trial lost or pruned
    assert runs["stridelab"]["pruned"] == 0
    pr = runs["stridelab (pruning)"]
    assert len(pr["values"]) + pr["pruned"] + pr["failed"] == 6
    # the target is the worse of the two bests, so both engines reach it, at a time inside their run
    assert s["target"] == max(min(runs["ray tune"]["values"]), min(runs["stridelab"]["values"]))
    for name in ("ray tune", "stridelab"):
        e = s["engines"][name]
        assert 0 < e["to_target_s"] <= e["wall_s"] and e["trials_per_min"] > 0 and e["best"] <= s["target"]
    assert s["ratios"]["trials_per_min_stridelab_over_tune"] > 0
    text = doc.read_text()
    assert text.startswith("# head") and text.rstrip().endswith("tail") and "\nold\n" not in text
    assert "| ray tune |" in text and "| stridelab |" in text and "verdict: stridelab's resident actors" in text
    assert "verdict:" in proc.stdout


def test_time_to_target_is_the_first_time_the_running_best_gets_there():
    assert b.time_to([3.0, 1.0, 2.0], [1.0, 5.0, 2.0], 2.0) == 2.0
    assert b.time_to([3.0, 1.0], [1.0, 5.0], 0.5) is None
