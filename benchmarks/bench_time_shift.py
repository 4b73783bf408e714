"""One more search dimension, measured: a per-step shift of the time fed to the model, learned by gradient.

    python benchmarks/bench_time_shift.py              # bundled:digits, ddim and dpmsolver++2m, NFE 5 and 10
    python benchmarks/bench_time_shift.py --quick      # gmm:ring8, tiny budgets, same code paths
    python benchmarks/bench_time_shift.py --from-json F

The step placement says where each step integrates (its level sigma_i). Decoupled from it, the network can be
asked at another level, log sigma_i + shift_i (`pipeline.core.noise.model_levels`): the remedy that
TS-DDIM (Li et al., ICLR 2024) proposes for the exposure bias of few-step samplers, here learned per step by
backpropagation against the teacher instead of picked by a rule. Per (solver, NFE), on the same tuning seeds
and the same held-out seeds, with the same Adam budget:

- ``placement``: gradient placement alone, from uniform (what ``sweep --method gradient`` runs);
- ``placement+shift``: the placement and the shift learned together, from uniform and zero shift;
- ``baseline+shift``: the steps of the best baseline on the tuning seeds kept fixed, only the shift learned.

Each result is projected to the model's integer timesteps and scored on held-out seeds (recon: per-dimension
MSE on [0, 1] vs the many-step DDIM teacher, the sweep's definition), with the paired 95% bootstrap interval
of its ratio to the best baseline on those seeds and of ``placement+shift`` to ``placement``.

The shift cannot be carried by any downstream scheduler (diffusers, k-diffusion and ComfyUI feed the model the
level they integrate at), so it is worth adding to the sweep only if it wins clearly here. Writes
docs/bench_time_shift.json and the section between ``<!-- time-shift -->`` markers of docs/BENCHMARKS.md
(atomically), with the machine and date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from budget import add_budget_args, add_report_args, budget_plan, load_averages, machine, publish, report_paths  # noqa: E402  (beside this file)

OUT = ROOT / "docs" / "BENCHMARKS.md"
RAW = ROOT / "docs" / "bench_time_shift.json"
BEGIN, END = "<!-- time-shift -->", "<!-- /time-shift -->"
FULL = {"model": "bundled:digits", "solvers": "ddim,dpmsolver++2m", "nfes": "5,10", "tune": 64, "holdout": 256,
        "iters": 30, "lr": 0.05, "teacher_nfe": 250}
QUICK = {"model": "gmm:ring8", "solvers": "ddim,dpmsolver++2m", "nfes": "5", "tune": 16, "holdout": 32,
         "iters": 4, "lr": 0.05, "teacher_nfe": 60}
"""The gradient budget of `benchmarks/bench_methods.py` (64 tuning seeds, 30 iterations), so the rows compare."""
VARIANTS = ("placement", "placement+shift", "baseline+shift")


def run_cell(m, solver: str, nfe: int, x_T: dict, x0: dict, plan: dict[str, Any]) -> dict[str, Any]:
    import torch

    from pipeline.core.schedules import SCHEDULES, make_schedule
    from pipeline.evaluation.distances import per_seed_mse
    from pipeline.evaluation.gradient import sample_with_shift, shard_loss_and_grad
    from pipeline.interop.defaults import default_spacing
    from pipeline.metrics.recon import paired_ratio_interval
    from pipeline.solvers.registry import get_solver
    from search.placement.gradient import GradientConfig, gradient_placement

    ac, (lo, hi) = m.alphas_cumprod, m.data_range
    scale = 1.0 / (hi - lo)
    steps = get_solver(solver).steps_for_budget(nfe)

    def recon(split: str, timesteps, shift=None) -> torch.Tensor:
        out = sample_with_shift(m.denoiser, x_T[split], list(timesteps), shift, ac, solver)
        return per_seed_mse(out, x0[split], scale).double()

    named = {"default": default_spacing(solver, steps, ac), **{n: make_schedule(n, steps, ac) for n in SCHEDULES}}
    named = {k: list(s.timesteps) for k, s in named.items()}
    tuned = {k: float(recon("tune", ts).mean()) for k, ts in named.items()}
    start_name = min(tuned, key=tuned.get)  # chosen on the tuning seeds, never on the held-out ones

    def grad_fn(time_shift: bool, freeze_steps: bool):
        def fn(theta, delta):
            total, g, gd = shard_loss_and_grad(m.denoiser, x_T["tune"], x0["tune"], theta, ac, delta=delta,
                                               scale=scale, solver=solver, time_shift=time_shift)
            if freeze_steps:  # only the shift moves: the logits' gradient is zero, so Adam leaves them
                g = g.clone()
                g[: steps + 1] = 0
            return total, g, gd

        fn.time_shift = time_shift
        return fn

    learned: dict[str, dict[str, Any]] = {}
    for variant in VARIANTS:
        shift_on = variant != "placement"
        init = named[start_name] if variant == "baseline+shift" else None
        t0 = time.perf_counter()
        res = gradient_placement(grad_fn(shift_on, variant == "baseline+shift"), steps, ac,
                                 GradientConfig(iters=plan["iters"], lr=plan["lr"], time_shift=shift_on),
                                 num_seeds=len(x_T["tune"]), init=init)
        seconds = time.perf_counter() - t0
        ts = named[start_name] if variant == "baseline+shift" else list(res.schedule.timesteps)
        shift = res.schedule.meta.get("model_log_sigma_shift")
        learned[variant] = {"timesteps": ts, "shift": shift, "wall_s": seconds, "loss_start": res.losses[0],
                            "loss_end": res.losses[-1]}
        print(f"  {variant}: {seconds:.0f} s, tuning loss {res.losses[0]:.3g} -> {res.losses[-1]:.3g}", flush=True)

    with torch.no_grad():
        base_err = {k: recon("hold", ts) for k, ts in named.items()}
        errs = {v: recon("hold", r["timesteps"], r["shift"]) for v, r in learned.items()}
    best = min(base_err, key=lambda k: float(base_err[k].mean()))
    rows = []
    for v, r in learned.items():
        e = errs[v]
        lo_b, hi_b = paired_ratio_interval(e, base_err[best])
        row = {"solver": solver, "nfe": nfe, "variant": v, "holdout_recon": float(e.mean()), "best_baseline": best,
               "best_baseline_recon": float(base_err[best].mean()), "x_best": float(e.mean() / base_err[best].mean()),
               "x_best_lo": lo_b, "x_best_hi": hi_b, "start": start_name if v == "baseline+shift" else "uniform", **r}
        ref = errs["placement"] if v == "placement+shift" else base_err[start_name] if v == "baseline+shift" else None
        if ref is not None:
            lo_r, hi_r = paired_ratio_interval(e, ref)
            row.update({"x_without_shift": float(e.mean() / ref.mean()), "x_ws_lo": lo_r, "x_ws_hi": hi_r})
        rows.append(row)
    return {"rows": rows, "baselines": {k: float(v.mean()) for k, v in base_err.items()}, "tuning_best": start_name}


def verdict(rows: list[dict[str, Any]]) -> str:
    shifted = [r for r in rows if "x_without_shift" in r]
    wins = [r for r in shifted if r["x_ws_hi"] < 1]
    losses = [r for r in shifted if r["x_ws_lo"] > 1]
    beats = [r for r in rows if r["variant"] != "placement" and r["x_best_hi"] < 1]
    return (f"verdict: the shift lowers held-out recon beyond its 95% interval in {len(wins)} of {len(shifted)} "
            f"comparisons with the same steps unshifted, raises it in {len(losses)}; a shifted variant beats the "
            f"cell's best baseline beyond its interval in {len(beats)} of {len(rows) - len(rows) // 3} cases.")


def render(raw: dict[str, Any]) -> str:
    meta, rows = raw["meta"], [r for c in raw["cells"] for r in c["rows"]]

    def g(v, spec=".3g"):
        return "n/a" if v is None else format(v, spec)

    lines = [BEGIN, "## A per-step model time shift (issue 13, item 2)", "",
             f"Measured {meta['date']} on {meta['machine']} (load average {meta['load']}); "
             f"`python benchmarks/bench_time_shift.py{' --quick' if meta['mode'] == 'quick' else ''}`, "
             f"{meta['wall_min']:.1f} min in all. Model {meta['model']}; tuning seeds 0..{meta['tune'] - 1}, "
             f"{meta['holdout']} held-out seeds from 1000000, {meta['teacher_nfe']}-step DDIM teacher, "
             f"{meta['iters']} Adam iterations (lr {meta['lr']}) per variant. Recon: per-dimension MSE on [0, 1] vs the "
             "teacher, held out; ratios with their paired 95% bootstrap interval. `x without shift`: placement+shift "
             "vs placement; baseline+shift vs the same baseline steps unshifted.", "",
             "| solver | NFE | variant | held-out recon | x best baseline [95%] | x without shift [95%] | wall s | "
             "shift (log sigma) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ws = (f"{g(r['x_without_shift'], '.3f')} [{g(r['x_ws_lo'], '.2f')}, {g(r['x_ws_hi'], '.2f')}]"
              if "x_without_shift" in r else "")
        shift = " ".join(f"{v:+.2f}" for v in r["shift"]) if r.get("shift") else ""
        lines.append(f"| {r['solver']} | {r['nfe']} | {r['variant']} ({r['start']}) | {g(r['holdout_recon'])} | "
                     f"**{g(r['x_best'], '.3f')}** [{g(r['x_best_lo'], '.2f')}, {g(r['x_best_hi'], '.2f')}] vs "
                     f"{r['best_baseline']} | {ws} | {g(r['wall_s'], '.0f')} | {shift} |")
    lines += ["", verdict(rows), "", END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_report_args(p, "bench_time_shift.json")
    add_budget_args(p, FULL, QUICK)
    args = p.parse_args(argv)
    from pipeline.io.reports import replace_section

    if args.from_json:
        replace_section(Path(args.doc) if args.doc else OUT, render(json.loads(Path(args.from_json).read_text())),
                        BEGIN, END)
        return 0
    import torch

    from pipeline.core.seeds import initial_noise
    from pipeline.metrics.teacher import run_teacher, teacher_timesteps
    from pipeline.models.load import load_model
    from search.sweep.config import HOLDOUT_OFFSET

    plan = budget_plan(args, FULL, QUICK)
    t_all, load0 = time.perf_counter(), load_averages()
    m = load_model(plan["model"])
    ac = m.alphas_cumprod
    seeds = {"tune": list(range(plan["tune"])), "hold": list(range(HOLDOUT_OFFSET, HOLDOUT_OFFSET + plan["holdout"]))}
    x_T = {k: initial_noise(s, m.sample_shape)[0] for k, s in seeds.items()}
    with torch.no_grad():
        x0 = {k: run_teacher(m.denoiser, v, teacher_timesteps(ac, plan["teacher_nfe"]), ac) for k, v in x_T.items()}
    cells = []
    for solver in plan["solvers"].split(","):
        for nfe in (int(v) for v in str(plan["nfes"]).split(",")):
            print(f"{solver} NFE {nfe}:", flush=True)
            cells.append(run_cell(m, solver, nfe, x_T, x0, plan))
    meta = {"date": dt.date.today().isoformat(), "mode": "quick" if args.quick else "full",
            "machine": machine(),
            "load": f"{load0} at the start, {load_averages()} at the end", "wall_min": (time.perf_counter() - t_all) / 60, **plan}
    raw = {"meta": meta, "cells": cells}
    json_path, doc = report_paths(args, RAW, OUT)
    publish(raw, json_path, doc, render(raw), BEGIN, END)
    return 0



if __name__ == "__main__":
    raise SystemExit(main())
