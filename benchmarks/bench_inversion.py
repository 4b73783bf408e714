"""DDIM inversion round trip: the schedule learned for it vs every baseline, held-out images, NFE 5, 10 and 20.

    python benchmarks/bench_inversion.py                  # the full size (bundled:digits, NFE 5, 10, 20)
    python benchmarks/bench_inversion.py --quick          # gmm:ring8, tiny budgets, same code paths
    python benchmarks/bench_inversion.py --from-json F    # re-render the section from saved figures

One real ``stridelab sweep --objective inversion`` subprocess per (model, NFE), budget flags below, each in a
temporary directory. Every number is read from the sweep's held-out table (``comparison.csv``): for the bundled
models the held-out images are the digits test split, never seen by the search (tuning and validation images
come from the train split; `pipeline.models.digits.data_index`). Error = per-image MSE on [0, 1] after encoding
with the schedule reversed and decoding with it (the DDIM paper's Table 2 protocol); the ratio to the best
baseline comes with its paired 95% bootstrap interval over the held-out images. Target (issue 16): <= 0.5x the
best baseline.

Each sweep runs with ``--inversion-pair joint`` (unless ``--pair-evals 0``): after the search, the exported
schedule's encoder and decoder are searched together on the tuning images and the pair is exported only where it
beats the symmetric round trip on the validation images. The table reads the symmetric learned row (``learned
(symmetric)`` where the pair was kept) against the baselines, and the pair against the symmetric round trip, with
a paired interval computed here on the same held-out images.

Then, in this process on the same held-out images: the asymmetric round trip, the learned decoder with an
encoder that takes `ENCODE_FACTORS` times as many steps (each gap of the decoder split evenly), as editing
workflows encode; its ratio to the symmetric learned round trip at the same decoder NFE, with the paired
interval. It costs that many more encoder evaluations: it is a trade, not a free gain.

The DDIM paper (Table 2, CIFAR-10, eta = 0) reports the round-trip error falling about 2x from S = 10 to S = 20;
the table gives our best baseline's and the learned schedule's factor from NFE 10 to 20 beside it.

The section goes into docs/BENCHMARKS.md between ``<!-- inversion -->`` markers (atomically), with the machine and
date; the raw figures go to docs/bench_inversion.json.
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
RAW = ROOT / "docs" / "bench_inversion.json"
BEGIN, END = "<!-- inversion -->", "<!-- /inversion -->"
TARGET = 0.5
PAPER_10_TO_20 = 2.0
"""DDIM paper, Table 2 (CIFAR-10): the round-trip error falls about this factor from S = 10 to S = 20."""
ENCODE_FACTORS = (2, 4)

FULL = {"models": ["bundled:digits"], "nfes": [5, 10, 20], "trials": 70, "polish": 30, "num_seeds": 256,
        "validation_seeds": 64, "holdout_seeds": 256, "teacher_nfe": 250}
QUICK = {"models": ["gmm:ring8"], "nfes": [5], "trials": 12, "polish": 2, "num_seeds": 16, "validation_seeds": 8,
         "holdout_seeds": 24, "teacher_nfe": 50, "schedules": "uniform,quadratic,karras,logsnr"}


def sweep_flags(plan: dict[str, Any], pair_evals: int = 0) -> list[str]:
    flags = ["--objective", "inversion", "--trials", str(plan["trials"]), "--polish", str(plan["polish"]),
             "--num-seeds", str(plan["num_seeds"]), "--validation-seeds", str(plan["validation_seeds"]),
             "--holdout-seeds", str(plan["holdout_seeds"]), "--teacher-nfe", str(plan["teacher_nfe"]),
             "--no-holdout-fid", "--actors", "0", "--seed", "0"]
    if pair_evals > 0:
        flags += ["--inversion-pair", "joint", "--pair-evals", str(pair_evals)]
    return flags + (["--schedules", plan["schedules"]] if plan.get("schedules") else [])


def run_one(model: str, nfe: int, flags: list[str], work: Path) -> dict[str, Any]:
    """One sweep subprocess; its held-out rows and wall time."""
    name = "".join(c if c.isalnum() else "-" for c in f"inv-{model}-{nfe}")
    cmd = [sys.executable, "-m", "jobs.cli", "sweep", "--model", model, "--nfe", str(nfe), *flags,
           "--study-name", name, "--out-dir", str(work / "out"), "--storage", str(work / "optuna.journal"), "--no-mlflow"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    log = work / f"{name}.log"
    with log.open("w") as f:
        rc = subprocess.run(cmd, cwd=work, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"sweep {model} nfe {nfe} failed (exit {rc}):\n{log.read_text()[-3000:]}")
    with (work / "out" / name / "comparison.csv").open() as f:
        rows = list(csv.DictReader(f))
    return {"model": model, "nfe": nfe, "wall_s": time.perf_counter() - t0,
            "cmd": " ".join(["stridelab", *cmd[3:cmd.index("--study-name")]]), "rows": rows, "log": log.read_text()}


def refine(timesteps: list[int], factor: int) -> list[int]:
    """A decreasing list with each gap of `timesteps` (and the last step's gap to 0) split into `factor` even
    parts (rounded, duplicates dropped): the encoder of an asymmetric round trip ends where the decoder starts."""
    points = [*timesteps, 0] if timesteps[-1] > 0 else list(timesteps)
    out: list[int] = []
    for a, b in zip(points, points[1:]):
        out += [round(a + (b - a) * j / factor) for j in range(factor)]
    if timesteps[-1] == 0:
        out.append(0)
    return sorted(set(out), reverse=True)


def asymmetric(model_spec: str, decoder: list[int], holdout_seeds: int, factors=ENCODE_FACTORS) -> dict[str, Any]:
    """Held-out round trip of the learned decoder with encoders `factors` times finer, vs the symmetric one."""
    import torch

    from pipeline.metrics.recon import paired_ratio_interval, round_trip
    from pipeline.models.load import load_model
    from search.sweep.config import HOLDOUT_OFFSET

    torch.set_num_threads(1)
    model = load_model(model_spec)
    x0 = model.denoiser.sample_data(list(range(HOLDOUT_OFFSET, HOLDOUT_OFFSET + holdout_seeds)))
    args = (model.alphas_cumprod, model.to_unit)
    sym = round_trip(model.denoiser, x0, decoder[::-1], decoder, *args).errors
    out: dict[str, Any] = {"symmetric": sym.mean().item(), "rows": []}
    for k in factors:
        enc = refine(decoder, k)
        # the encoder ends at the decoder's first timestep; the decoder's own steps are all among the encoder's
        errs = round_trip(model.denoiser, x0, enc[::-1], decoder, *args).errors
        lo, hi = paired_ratio_interval(errs, sym)
        out["rows"].append({"factor": k, "encoder_steps": len(enc), "error": errs.mean().item(),
                            "x_symmetric": errs.mean().item() / sym.mean().item(), "lo": lo, "hi": hi})
    return out


def symmetric_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The symmetric learned round trip's row: ``learned (symmetric)`` where the sweep kept a joint pair, else the
    learned row itself."""
    from search.sweep.holdout import PAIR_SYMMETRIC

    return next((r for r in rows if r["schedule"] == PAIR_SYMMETRIC), rows[0])


def pair_holdout(model_spec: str, rows: list[dict[str, Any]], holdout_seeds: int, log_text: str) -> dict[str, Any]:
    """What the sweep's joint encoder/decoder search gave: kept or not (its log line says why), and where kept,
    the pair's held-out round trip against the symmetric one's on the same images, with the paired interval."""
    import torch

    from pipeline.metrics.recon import paired_ratio_interval, round_trip
    from pipeline.models.load import load_model
    from search.sweep.config import HOLDOUT_OFFSET

    said = next((ln for ln in log_text.splitlines() if ln.startswith("joint encoder/decoder search")), "")
    learned, sym_row = rows[0], symmetric_row(rows)
    out: dict[str, Any] = {"kept": "encode_timesteps" in learned and bool(learned["encode_timesteps"]), "log": said}
    if not out["kept"]:
        return out
    torch.set_num_threads(1)
    model = load_model(model_spec)
    x0 = model.denoiser.sample_data(list(range(HOLDOUT_OFFSET, HOLDOUT_OFFSET + holdout_seeds)))
    args = (model.alphas_cumprod, model.to_unit)
    sym_d = [int(t) for t in sym_row["timesteps"].split()]
    d = [int(t) for t in learned["timesteps"].split()]
    e = [int(t) for t in learned["encode_timesteps"].split()]
    sym = round_trip(model.denoiser, x0, sym_d[::-1], sym_d, *args).errors
    errs = round_trip(model.denoiser, x0, e, d, *args).errors
    lo, hi = paired_ratio_interval(errs, sym)
    out.update({"decoder": d, "encoder": e, "symmetric": sym.mean().item(), "error": errs.mean().item(),
                "x_symmetric": errs.mean().item() / sym.mean().item(), "lo": lo, "hi": hi})
    return out


def _f(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, NFE): the learned row, the best DDIM baseline, every baseline's error."""
    out = []
    for r in runs:
        rows = r["rows"]
        learned = symmetric_row(rows)
        base = [x for x in rows[1:] if x.get("solver") == "ddim" and not x["schedule"].startswith(("teacher", "learned"))
                and _f(x.get("holdout_inversion")) is not None]
        best = min(base, key=lambda x: _f(x["holdout_inversion"]))
        out.append({"model": r["model"], "nfe": r["nfe"], "wall_s": r["wall_s"],
                    "learned": _f(learned["holdout_inversion"]), "timesteps": learned["timesteps"],
                    "ratio": _f(learned.get("inv_x_best_baseline")), "lo": _f(learned.get("inv_x_best_baseline_lo")),
                    "hi": _f(learned.get("inv_x_best_baseline_hi")), "best_baseline": best["schedule"],
                    "best_baseline_error": _f(best["holdout_inversion"]),
                    "baselines": {x["schedule"]: _f(x["holdout_inversion"]) for x in base},
                    "asymmetric": r.get("asymmetric"), "pair": r.get("pair")})
    return out


def render(summary: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    def g(v: float | None, spec: str = ".3g") -> str:
        return "n/a" if v is None else format(v, spec)

    lines = [BEGIN, "## DDIM inversion round trip (issue 16)", "",
             f"Measured {meta['date']} on {meta['machine']}; `python benchmarks/bench_inversion.py` ({meta['mode']}), "
             f"{meta['wall_min']:.0f} min in all{meta.get('load', '')}. Per cell: `{meta['cmd']}`. Error = per-image MSE "
             "on [0, 1] of encode (schedule reversed) + decode, on held-out images (the digits test split for the "
             "bundled models); interval: paired 95% bootstrap over those images.", "",
             f"| model | NFE | learned | best baseline | learned / best (95% CI) | target <= {TARGET} | learned timesteps |",
             "|---|---|---|---|---|---|---|"]
    for s in summary:
        met = "met" if s["hi"] is not None and s["hi"] <= TARGET else (
            "met (point), interval crosses" if s["ratio"] is not None and s["ratio"] <= TARGET else "**not met**")
        lines.append(f"| {s['model']} | {s['nfe']} | {g(s['learned'])} | {s['best_baseline']} {g(s['best_baseline_error'])} "
                     f"| **{g(s['ratio'], '.3f')}** ({g(s['lo'], '.3f')}-{g(s['hi'], '.3f')}) | {met} | {s['timesteps']} |")
    lines += ["", "Every DDIM baseline's held-out round-trip error:", ""]
    names = sorted({n for s in summary for n in s["baselines"]})
    lines += ["| model | NFE | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for s in summary:
        lines.append(f"| {s['model']} | {s['nfe']} | " + " | ".join(g(s["baselines"].get(n)) for n in names) + " |")
    trend = []
    for model in sorted({s["model"] for s in summary}):
        by = {s["nfe"]: s for s in summary if s["model"] == model}
        if 10 in by and 20 in by:
            trend.append(f"{model}: best baseline {g(by[10]['best_baseline_error'] / by[20]['best_baseline_error'], '.2f')}x, "
                         f"learned {g(by[10]['learned'] / by[20]['learned'], '.2f')}x")
    if trend:
        lines += ["", f"Error at NFE 10 / error at NFE 20: {'; '.join(trend)}; the DDIM paper (Table 2, CIFAR-10): "
                  f"about {PAPER_10_TO_20:g}x."]
    asym = [s for s in summary if s.get("asymmetric")]
    if asym:
        lines += ["", "Asymmetric round trip: the learned decoder, an encoder k times finer (k x the encoder's model "
                  "evaluations), same held-out images; ratio to the symmetric learned round trip:", "",
                  "| model | NFE (decoder) | symmetric | k | encoder steps | asymmetric | x symmetric (95% CI) |",
                  "|---|---|---|---|---|---|---|"]
        for s in asym:
            a = s["asymmetric"]
            for r in a["rows"]:
                lines.append(f"| {s['model']} | {s['nfe']} | {g(a['symmetric'])} | {r['factor']} | {r['encoder_steps']} | "
                             f"{g(r['error'])} | {g(r['x_symmetric'], '.3f')} ({g(r['lo'], '.3f')}-{g(r['hi'], '.3f')}) |")
    pairs = [s for s in summary if s.get("pair")]
    if pairs:
        lines += ["", "`--inversion-pair joint`: the sweep then searches the exported schedule's encoder and decoder "
                  "together on the tuning images (compass search from the symmetric pair, same NFE each way, the "
                  "noisiest step kept at T - 1) and keeps the pair only where it beats the symmetric round trip on "
                  "the validation images; held-out images:", "",
                  "| model | NFE | kept | symmetric | pair | x symmetric (95% CI) | encoder | decoder |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in pairs:
            a = s["pair"]
            if not a.get("kept"):
                lines.append(f"| {s['model']} | {s['nfe']} | no | {g(s['learned'])} | - | 1 (the symmetric pair "
                             f"stays) | | |")
                continue
            lines.append(f"| {s['model']} | {s['nfe']} | yes | {g(a['symmetric'])} | {g(a['error'])} | "
                         f"{g(a['x_symmetric'], '.3f')} ({g(a['lo'], '.3f')}-{g(a['hi'], '.3f')}) | "
                         f"{' '.join(map(str, a['encoder']))} | {' '.join(map(str, a['decoder']))} |")
    lines += ["", END]
    return "\n".join(lines)


def write_section(text: str, out: Path = OUT) -> None:
    from pipeline.io.reports import replace_section

    replace_section(out, text, BEGIN, END)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="gmm:ring8, tiny budgets: a smoke run of the same code")
    p.add_argument("--from-json", default=None, help="re-render docs/BENCHMARKS.md's section from saved figures")
    p.add_argument("--models", default=None, help="comma-separated models (default bundled:digits)")
    p.add_argument("--nfes", default=None, help="comma-separated NFEs (default 5,10,20)")
    for k in ("trials", "polish", "num_seeds", "validation_seeds", "holdout_seeds", "teacher_nfe"):
        p.add_argument("--" + k.replace("_", "-"), type=int, default=None, help=f"the sweeps' --{k.replace('_', '-')}")
    p.add_argument("--no-asymmetric", dest="asymmetric", action="store_false", help="skip the asymmetric round trips")
    p.add_argument("--pair-evals", type=int, default=None,
                   help="each sweep's --inversion-pair joint --pair-evals (0: symmetric sweeps only; default 60, quick 8)")
    p.add_argument("--out", default=None, help="write the section here instead of docs/BENCHMARKS.md (and no JSON)")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else OUT
    if args.from_json:
        raw = json.loads(Path(args.from_json).read_text())
        write_section(render(summarise(raw["runs"]), raw["meta"]), out)
        return 0
    plan = dict(QUICK if args.quick else FULL)
    if args.models:
        plan["models"] = args.models.split(",")
    if args.nfes:
        plan["nfes"] = [int(v) for v in args.nfes.split(",")]
    for k in ("trials", "polish", "num_seeds", "validation_seeds", "holdout_seeds", "teacher_nfe"):
        if getattr(args, k) is not None:
            plan[k] = getattr(args, k)
    if args.pair_evals is None:
        args.pair_evals = 8 if args.quick else 60
    flags = sweep_flags(plan, args.pair_evals)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    runs = []
    with tempfile.TemporaryDirectory(prefix="stridelab-bench-inv-") as tmp:
        for model in plan["models"]:
            for nfe in plan["nfes"]:
                print(f"sweep --objective inversion {model} nfe {nfe} ...", flush=True)
                run = run_one(model, nfe, flags, Path(tmp))
                if args.pair_evals > 0:
                    run["pair"] = pair_holdout(model, run["rows"], plan["holdout_seeds"], run.pop("log"))
                run.pop("log", None)
                if args.asymmetric:
                    decoder = [int(t) for t in symmetric_row(run["rows"])["timesteps"].split()]
                    run["asymmetric"] = asymmetric(model, decoder, plan["holdout_seeds"])
                runs.append(run)
                if not args.quick and not args.out:  # keep what is done: a later failure must not lose it
                    from pipeline.io.files import atomic_write_json

                    atomic_write_json(RAW.with_suffix(".partial.json"), {"runs": runs, "flags": flags})
                sym = symmetric_row(run["rows"])
                print(f"  {run['wall_s']:.0f} s; learned {sym['holdout_inversion']} x best "
                      f"{sym.get('inv_x_best_baseline')}; joint pair kept: {run.get('pair', {}).get('kept')}", flush=True)
    meta = {"date": dt.date.today().isoformat(), "mode": "quick" if args.quick else "full",
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU" if not _cuda() else "GPU",
            "cmd": "stridelab sweep --model MODEL --nfe NFE " + " ".join(flags), "wall_min": (time.perf_counter() - t0) / 60,
            "load": f" (1-min load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end)"}
    summary = summarise(runs)
    text = render(summary, meta)
    if not args.quick or args.out:
        from pipeline.io.files import atomic_write_json

        if not args.out:
            atomic_write_json(RAW, {"meta": meta, "summary": summary, "runs": runs})
        write_section(text, out)
    print(text)
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    raise SystemExit(main())
