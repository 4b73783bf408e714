"""Each solver of the family vs its diffusers scheduler loop, at equal NFE and equal outputs.

Per solver with a diffusers twin (`pipeline.evaluation.twins`): the wall time of our function and of the
scheduler loop over the same denoiser, x_T and timestep list (NFE 10: 10 steps, Heun 5 steps = 9
evaluations), interleaved reps, medians, and the ratio ours / diffusers measured in this one run. A second
ratio uses a free denoiser (a fixed eps tensor), so it is the solvers' own per-step cost, which the
network's time otherwise hides. Outputs are checked equal (1e-4: float32 noise over 256 seeds) first.

    python benchmarks/bench_solvers.py [--seeds 256] [--nfe 10] [--reps 3] [--model bundled:digits]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _pair(spec, denoiser, x_T, ts, abar, reps: int) -> tuple[float, float]:
    """Median seconds (ours, diffusers), alternating which runs first in each rep."""
    from pipeline.evaluation.twins import configure_twin, scheduler_loop

    def ours():
        return spec.sample(denoiser, x_T, ts, abar)

    def theirs():  # configuring the scheduler is part of its cost, as it is in a trial
        sched, calls, scale = configure_twin(spec, ts, abar)
        return scheduler_loop(denoiser, x_T, sched, calls, scale)

    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    for rep in range(reps):
        order = [("ours", ours), ("theirs", theirs)][:: 1 if rep % 2 == 0 else -1]
        for key, fn in order:
            times[key] += _timed(fn, 1)
    return statistics.median(times["ours"]), statistics.median(times["theirs"])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=256)
    ap.add_argument("--nfe", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--model", default="bundled:digits")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")

    import torch

    from pipeline.core.schedules import uniform
    from pipeline.evaluation.twins import run_twin
    from pipeline.models.load import load_model
    from pipeline.solvers import SOLVERS

    m = load_model(args.model)
    abar = m.alphas_cumprod
    x_T = torch.randn(args.seeds, *m.sample_shape, generator=torch.Generator().manual_seed(0))
    eps_fixed = torch.randn_like(x_T) * 0.1
    free = lambda x, t: eps_fixed  # noqa: E731  (no network: the solvers' own cost)
    rows = {}
    print(f"machine: {platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{datetime.now(timezone.utc):%Y-%m-%d}; {args.model}, {args.seeds} seeds, NFE {args.nfe}, "
          f"{args.reps} reps (medians)")
    print(f"{'solver':15s} {'steps':>5s} {'ours s':>8s} {'diffusers s':>11s} {'ratio':>6s}   {'no-model ratio':>14s}")
    with torch.no_grad():
        for name, spec in SOLVERS.items():
            if spec.diffusers_class is None or spec.diffusers_class.startswith("Stride"):
                continue
            ts = list(uniform(spec.steps_for_budget(args.nfe), abar).timesteps)
            diff = (spec.sample(m.denoiser, x_T, ts, abar) - run_twin(spec, m.denoiser, x_T, ts, abar)).abs().max()
            if diff > 1e-4:  # float32 noise over 256 seeds reaches ~3e-5 (tests: 2e-5 on 4)
                raise SystemExit(f"{name}: outputs differ by {diff:.2e}; timing different work means nothing")
            ours, theirs = _pair(spec, m.denoiser, x_T, ts, abar, args.reps)
            ours_free, theirs_free = _pair(spec, free, x_T, ts, abar, max(args.reps, 5))
            rows[name] = {"ours_s": ours, "diffusers_s": theirs, "ratio": ours / theirs,
                          "no_model_ratio": ours_free / theirs_free}
            print(f"{name:15s} {len(ts):5d} {ours:8.3f} {theirs:11.3f} {ours / theirs:6.3f}   "
                  f"{ours_free / theirs_free:14.3f}", flush=True)
    return rows


if __name__ == "__main__":
    main()
