"""Learned schedules per solver, both bundled models, NFE 5 and 10: does learning for the solver you run pay?

    python benchmarks/bench_solver_schedules.py                  # what `make bench` runs after run_all.py
    python benchmarks/bench_solver_schedules.py --quick          # gmm:ring8, tiny budgets, same code paths
    python benchmarks/bench_solver_schedules.py --from-json F    # re-render the section from saved figures

One real ``stridelab sweep --solver S`` subprocess per (model, solver, NFE), budget flags below, each in
its own temporary directory. Every number is read from the sweep's held-out table (``comparison.csv``,
seeds disjoint from the tuning ones): recon vs the many-step DDIM teacher with its standard error, and
FID on the same held-out samples. The reference rows of each table (every other solver with its own
diffusers default spacing at the same NFE) give the best *default pair*, the strongest zero-search
choice a user has. Targets (issue 12):

- learned for dpmsolver++2m and for unipc: <= 0.6x the held-out recon of that solver's best baseline at NFE 10;
- the best learned (solver, schedule) pair: <= 0.5x the recon of the best default pair, at NFE 5 and 10.

The section is written into docs/BENCHMARKS.md between ``<!-- solver-schedules -->`` markers (atomically),
with the machine and date; the raw figures go to docs/bench_solver_schedules.json.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "docs" / "BENCHMARKS.md"
RAW = ROOT / "docs" / "bench_solver_schedules.json"
BEGIN, END = "<!-- solver-schedules -->", "<!-- /solver-schedules -->"

FULL = {"models": ["bundled:digits", "bundled:digits-v"], "solvers": ["ddim", "dpmsolver++2m", "unipc"],
        "nfes": [5, 10], "flags": ["--trials", "64", "--polish", "32", "--num-seeds", "128", "--holdout-seeds", "256"]}
QUICK = {"models": ["gmm:ring8"], "solvers": ["ddim", "dpmsolver++2m"], "nfes": [5],
         "flags": ["--trials", "16", "--polish", "4", "--num-seeds", "16", "--holdout-seeds", "32",
                   "--teacher-nfe", "100", "--no-holdout-fid"]}
TARGET_OWN, TARGET_PAIR = 0.6, 0.5


def run_one(model: str, solver: str, nfe: int, flags: list[str], work: Path) -> dict[str, Any]:
    """One sweep subprocess; its held-out rows and wall time."""
    name = "".join(c if c.isalnum() else "-" for c in f"b-{model}-{solver}-{nfe}".replace("+", "p"))
    cmd = [sys.executable, "-m", "jobs.cli", "sweep", "--model", model, "--solver", solver, "--nfe", str(nfe),
           *flags, "--study-name", name, "--out-dir", str(work / "out"), "--storage", str(work / "optuna.journal"),
           "--no-mlflow"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    log = work / f"{name}.log"
    with log.open("w") as f:
        rc = subprocess.run(cmd, cwd=work, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"sweep {model} {solver} nfe {nfe} failed (exit {rc}):\n{log.read_text()[-3000:]}")
    with (work / "out" / name / "comparison.csv").open() as f:
        rows = list(csv.DictReader(f))
    return {"model": model, "solver": solver, "nfe": nfe, "wall_s": time.perf_counter() - t0,
            "cmd": " ".join(["stridelab", *cmd[3:]]), "rows": rows}


def _f(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _pair_label(row: dict[str, Any]) -> str:
    """``unipc default`` for a reference row, ``ddim default`` for the sweep's own, ``ddim uniform`` otherwise."""
    name = row["schedule"]
    return name if name.endswith(" default") else f"{row.get('solver')} {name}"


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, nfe, solver): learned vs its best baseline; per (model, nfe): best learned vs best default pair."""
    out = []
    for r in runs:
        rows = r["rows"]
        learned = rows[0]
        own = [x for x in rows[1:] if x.get("solver") == r["solver"] and not x["schedule"].startswith("teacher")]
        best_own = min(own, key=lambda x: _f(x["holdout_recon"]) or float("inf"))
        defaults = [x for x in rows if x["schedule"] == "default" or x["schedule"].endswith(" default")
                    or (r["solver"] == "ddim" and x["schedule"] == "uniform")]
        best_default = min(defaults, key=lambda x: _f(x["holdout_recon"]) or float("inf"))
        out.append({
            "model": r["model"], "nfe": r["nfe"], "solver": r["solver"], "wall_s": r["wall_s"],
            "learned": _f(learned["holdout_recon"]), "learned_sem": _f(learned.get("holdout_recon_sem")),
            "learned_fid": _f(learned.get("holdout_fid")), "timesteps": learned["timesteps"],
            "best_baseline": best_own["schedule"], "best_baseline_recon": _f(best_own["holdout_recon"]),
            "best_baseline_fid": _f(best_own.get("holdout_fid")),
            "best_default_pair": _pair_label(best_default),
            "best_default_recon": _f(best_default["holdout_recon"]), "best_default_fid": _f(best_default.get("holdout_fid")),
        })
    return out


def render(summary: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    def g(v: float | None, spec: str = ".3g") -> str:
        return "n/a" if v is None else format(v, spec)

    lines = [BEGIN, "## Learned schedules per solver (issue 12)", "",
             f"Measured {meta['date']} on {meta['machine']}; `python benchmarks/bench_solver_schedules.py` "
             f"({meta['mode']}), {meta['wall_min']:.0f} min in all. Sweep budget per cell: `{' '.join(meta['flags'])}` "
             "(the default sweep but for these flags). Held-out seeds (256 from 1000000), 250-step DDIM teacher; "
             "recon = per-dimension MSE on [0, 1] vs the teacher (+- its standard error); FID on the same samples "
             "(digits features).", "",
             "| model | NFE | solver | learned recon | its best baseline | learned / best baseline | learned FID | "
             "baseline FID |", "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        ratio = s["learned"] / s["best_baseline_recon"] if s["learned"] and s["best_baseline_recon"] else None
        lines.append(f"| {s['model']} | {s['nfe']} | {s['solver']} | {g(s['learned'])} +- {g(s['learned_sem'], '.2g')} | "
                     f"{s['best_baseline']} {g(s['best_baseline_recon'])} | **{g(ratio, '.3f')}** | "
                     f"{g(s['learned_fid'], '.3f')} | {g(s['best_baseline_fid'], '.3f')} |")
    lines += ["", "Best learned pair vs the best default pair (any solver with its own diffusers default spacing):", "",
              "| model | NFE | best learned (solver) | recon | best default pair | recon | ratio (target <= 0.5) | "
              "FID learned / default |", "|---|---|---|---|---|---|---|---|"]
    keys = sorted({(s["model"], s["nfe"]) for s in summary})
    for model, nfe in keys:
        cell = [s for s in summary if s["model"] == model and s["nfe"] == nfe]
        best = min(cell, key=lambda s: s["learned"] or float("inf"))
        dflt = min(cell, key=lambda s: s["best_default_recon"] or float("inf"))
        ratio = best["learned"] / dflt["best_default_recon"] if best["learned"] and dflt["best_default_recon"] else None
        lines.append(f"| {model} | {nfe} | {best['solver']} | {g(best['learned'])} | {dflt['best_default_pair']} | "
                     f"{g(dflt['best_default_recon'])} | **{g(ratio, '.3f')}** | "
                     f"{g(best['learned_fid'], '.3f')} / {g(dflt['best_default_fid'], '.3f')} |")
    lines += ["", END]
    return "\n".join(lines)


def write_section(text: str) -> None:
    from pipeline.io.reports import replace_section

    replace_section(OUT, text, BEGIN, END)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="gmm:ring8, tiny budgets: a smoke run of the same code")
    p.add_argument("--from-json", default=None, help="re-render docs/BENCHMARKS.md's section from saved figures")
    p.add_argument("--models", default=None, help="comma-separated models (default: both bundled)")
    p.add_argument("--solvers", default=None, help="comma-separated solvers (default ddim,dpmsolver++2m,unipc)")
    p.add_argument("--nfes", default=None, help="comma-separated NFEs (default 5,10)")
    args = p.parse_args(argv)
    if args.from_json:
        raw = json.loads(Path(args.from_json).read_text())
        write_section(render(summarise(raw["runs"]), raw["meta"]))  # summarised again: the rows are the record
        return 0
    plan = dict(QUICK if args.quick else FULL)
    for key in ("models", "solvers", "nfes"):
        if getattr(args, key):
            plan[key] = [int(v) if key == "nfes" else v for v in getattr(args, key).split(",")]
    t0 = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory(prefix="stridelab-bench-") as tmp:
        for model in plan["models"]:
            for nfe in plan["nfes"]:
                for solver in plan["solvers"]:
                    print(f"sweep {model} {solver} nfe {nfe} ...", flush=True)
                    runs.append(run_one(model, solver, nfe, plan["flags"], Path(tmp)))
                    print(f"  {runs[-1]['wall_s']:.0f} s; learned {runs[-1]['rows'][0]['holdout_recon']}", flush=True)
                    if not args.quick:  # keep what is done: a later failure must not lose the finished sweeps
                        from pipeline.io.files import atomic_write_json

                        atomic_write_json(RAW.with_suffix(".partial.json"), {"runs": runs})
    summary = summarise(runs)
    meta = {"date": dt.date.today().isoformat(), "mode": "quick" if args.quick else "full",
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU" if not _cuda() else "GPU",
            "flags": plan["flags"], "wall_min": (time.perf_counter() - t0) / 60}
    if not args.quick:
        from pipeline.io.files import atomic_write_json

        atomic_write_json(RAW, {"meta": meta, "summary": summary, "runs": runs})
        write_section(render(summary, meta))
    print(render(summary, meta))
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    raise SystemExit(main())
