"""Gradient step placement alone (before any Optuna trial) vs each solver's best baseline, on held-out seeds.

For each solver of `pipeline.evaluation.gradient.DIFFERENTIABLE` asked for: learn the n continuous steps on
the tuning seeds (`search.placement.gradient`, started from uniform), project them to integer timesteps,
then score that schedule and every baseline (`pipeline.core.schedules.SCHEDULES`, plus the solver's
diffusers default spacing) on held-out seeds against the same teacher. recon = per-dimension MSE on the
[0, 1] scale vs the teacher (the sweep's definition); the interval is the paired bootstrap
`pipeline.metrics.recon.paired_ratio_interval` of gradient / best baseline over the held-out seeds.

The network runs unwrapped, in one batch per call (the sweep's evaluators pad to fixed micro-batches for
bit-level batch invariance, which costs a full batch even for a few seeds); the numbers are the same
definitions as the sweep's held-out table, not its bits.

Measured 2026-12-02 on 2 shared CPU cores (load average ~13, so the settings are tiny: 16 tuning seeds,
32 held-out seeds, 8 Adam iterations, a 100-step teacher; 11.7 min wall in all), NFE 10, bundled:digits:
the placement alone, started from uniform, lowered its tuning loss (DDIM 1.53e-3 -> 0.94e-3; DPM-Solver++ 2M
8.0e-3 -> 0.83e-3) but lost on the held-out seeds: DDIM 1.80x the best baseline (uniform) [1.28, 1.95];
2M 8.7x the best (trailing) [1.40, 14.1]. So at this size it fits the tuning seeds; larger runs untried.

    python benchmarks/bench_gradient.py --solvers ddim,dpmsolver++2m --nfe 10 --tune 32 --holdout 64 --iters 15
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pipeline.core.schedules import SCHEDULES, make_schedule
from pipeline.core.seeds import initial_noise
from pipeline.evaluation.distances import per_seed_mse
from pipeline.interop.defaults import default_spacing
from pipeline.metrics.recon import paired_ratio_interval
from pipeline.metrics.teacher import run_teacher, teacher_timesteps
from pipeline.models.load import load_model
from pipeline.solvers.registry import get_solver
from search.placement.gradient import GradientConfig, gradient_placement
from search.sweep.config import HOLDOUT_OFFSET


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bundled:digits")
    p.add_argument("--solvers", default="ddim,dpmsolver++2m")
    p.add_argument("--nfe", type=int, default=10)
    p.add_argument("--tune", type=int, default=32, help="tuning seeds 0 .. tune - 1")
    p.add_argument("--holdout", type=int, default=64, help="held-out seeds from 1000000")
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--teacher-nfe", type=int, default=250)
    p.add_argument("--out", default=None, help="write the report as JSON here")
    a = p.parse_args(argv)
    t_all = time.perf_counter()
    m = load_model(a.model)
    ac, lo, hi = m.alphas_cumprod, *m.data_range
    tune, hold = list(range(a.tune)), list(range(HOLDOUT_OFFSET, HOLDOUT_OFFSET + a.holdout))
    t0 = time.perf_counter()
    x_T = {k: initial_noise(s, m.sample_shape)[0] for k, s in (("tune", tune), ("hold", hold))}
    with torch.no_grad():
        x0 = {k: run_teacher(m.denoiser, v, teacher_timesteps(ac, a.teacher_nfe), ac) for k, v in x_T.items()}
    report: dict = {"model": a.model, "nfe": a.nfe, "tuning_seeds": [0, a.tune], "holdout_seeds": [HOLDOUT_OFFSET, a.holdout],
                    "teacher_nfe": a.teacher_nfe, "iters": a.iters, "lr": a.lr, "teacher_s": time.perf_counter() - t0}
    from pipeline.evaluation.gradient import shard_loss_and_grad

    for solver in a.solvers.split(","):
        steps = get_solver(solver).steps_for_budget(a.nfe)

        def fn(theta, delta, solver=solver):
            return shard_loss_and_grad(m.denoiser, x_T["tune"], x0["tune"], theta, ac, delta=delta,
                                       scale=1.0 / (hi - lo), solver=solver)

        t0 = time.perf_counter()
        res = gradient_placement(fn, steps, ac, GradientConfig(iters=a.iters, lr=a.lr), num_seeds=a.tune)
        grad_s = time.perf_counter() - t0
        named = {"gradient": res.schedule, "default": default_spacing(solver, steps, ac),
                 **{n: make_schedule(n, steps, ac) for n in SCHEDULES}}
        errs = {}
        with torch.no_grad():
            for name, s in named.items():
                out = get_solver(solver).sample(m.denoiser, x_T["hold"], list(s.timesteps), ac)
                errs[name] = per_seed_mse(out, x0["hold"], 1.0 / (hi - lo)).double()
        base = {k: float(v.mean()) for k, v in errs.items() if k != "gradient"}
        best = min(base, key=base.get)
        lo_r, hi_r = paired_ratio_interval(errs["gradient"], errs[best])
        report[solver] = {"steps": steps, "gradient_s": grad_s, "loss_start": res.losses[0], "loss_end": res.losses[-1],
                          "timesteps": list(res.schedule.timesteps),
                          "continuous_timesteps": [round(v, 2) for v in res.schedule.meta["continuous_timesteps"]],
                          "holdout_recon_gradient": float(errs["gradient"].mean()), "best_baseline": best,
                          "holdout_recon_best_baseline": base[best], "ratio": float(errs["gradient"].mean()) / base[best],
                          "ratio_95": [lo_r, hi_r], "holdout_recon_baselines": base}
        print(json.dumps({solver: report[solver]}, indent=1), flush=True)
    report["total_s"] = time.perf_counter() - t_all
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
