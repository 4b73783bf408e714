"""Placement methods side by side: one run, the same tuning and held-out seeds for every cell.

    python benchmarks/bench_methods.py                 # full (the budget flags below; ~30 min on 2 idle cores)
    python benchmarks/bench_methods.py --quick         # gmm:ring8, tiny budgets, same code paths (a minute or two)
    python benchmarks/bench_methods.py --from-json F   # re-render the section from saved figures

For each solver (ddim, dpmsolver++2m) and NFE (5, 10) on bundled:digits, every way the project has to place
steps is run and then scored on the same held-out seeds:

- zero-search baselines: the solver's diffusers default spacing (``default``), AYS interpolated (``ays``) and
  every other schedule of `pipeline.core.schedules.SCHEDULES`;
- ``dp`` (GITS-like) and ``dp_free`` (OSS-like, the DP also chooses the first step), `search.placement.dp`;
- ``tpe+polish``: the default sweep (warm starts, Optuna TPE, compass polish, validation) at the trial budget;
- ``cmaes``: the same with CMA-ES started from the warm starts, no polish;
- ``gradient``: the LD3-style placement from uniform steps; ``dp+gradient``: the same started from ``dp``.

Every searched method is one `search.sweep.run_sweep` on the loaded model, its evaluations in this process
(the same cores for all): its wall time is the sweep's minus the sweep's own held-out table (on one seed,
unused here), and its model evaluations are counted by wrapping the network (one sample through the network
once = 1; the teacher on the tuning and validation seeds included, the gradient's backward passes not).
Gradient placement for a solver the library cannot differentiate is reported "not supported" (found by
building its `SweepConfig`, not assumed). Held-out: one `SamplerPool` per cell on the held-out seeds with
FID (bundled features); recon vs the many-step DDIM teacher; the ratio to the best baseline of that cell and
its paired 95% bootstrap interval (`pipeline.metrics.recon.paired_ratio_interval`).

Writes docs/bench_methods.json and the section between ``<!-- methods -->`` markers of docs/BENCHMARKS.md
(atomically), with the machine and date, and prints a one-line verdict.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from budget import add_budget_args, add_report_args, budget_plan, load_averages, machine, report_paths  # noqa: E402  (beside this file)

OUT = ROOT / "docs" / "BENCHMARKS.md"
RAW = ROOT / "docs" / "bench_methods.json"
BEGIN, END = "<!-- methods -->", "<!-- /methods -->"

FULL = {"model": "bundled:digits", "solvers": "ddim,dpmsolver++2m", "nfes": "5,10", "trials": 40, "polish": 16,
        "num_seeds": 64, "validation_seeds": 32, "holdout_seeds": 256, "teacher_nfe": 250, "grad_iters": 30,
        "dp_seeds": 32}
"""About 2 million counted model evaluations over the four cells (gradient backward passes as two forwards each),
about 30 minutes at the ~1,100 evaluations per second the default sweep reaches on 2 idle cores (an estimate from
the counts, not yet timed idle; each method's sweep computes its own teacher, as a user's run would)."""
QUICK = {"model": "gmm:ring8", "solvers": "ddim,dpmsolver++2m", "nfes": "5", "trials": 14, "polish": 2,
         "num_seeds": 12, "validation_seeds": 8, "holdout_seeds": 24, "teacher_nfe": 60, "grad_iters": 3,
         "dp_seeds": 8}
SEARCHED = ("dp", "dp_free", "tpe+polish", "cmaes", "gradient", "dp+gradient")
COLUMNS = ("solver", "nfe", "method", "kind", "holdout_recon", "x_best_baseline", "x_lo", "x_hi", "holdout_fid",
           "wall_s", "model_evals", "timesteps", "note")


# --------------------------------------------------------------------------------------------------
# counting model evaluations


def counting(model: Any) -> Any:
    """`model` with its network wrapped so that every sample passed through it is counted (``.denoiser.count``)."""
    import torch

    class Counted(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner, self.count = inner, 0

        def forward(self, x, t, *args, **kw):
            self.count += int(x.shape[0])
            return self.inner(x, t, *args, **kw)

        def __getattr__(self, name: str) -> Any:  # sample_data and friends: the network's own
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.inner, name)

    return dataclasses.replace(model, denoiser=Counted(model.denoiser))


# --------------------------------------------------------------------------------------------------
# one method = one sweep


def method_config(base: Any, method: str) -> Any:
    """The `SweepConfig` of one searched method (raises StridelabError where the library refuses it)."""
    r = dataclasses.replace
    one = dict(polish=0, validation_seeds=0)  # one candidate: nothing to polish or to choose among
    if method in ("dp", "dp_free"):
        return r(base, baselines=(method,), trials=1, **one)
    if method == "tpe+polish":
        return r(base, sampler="tpe", baselines=None)
    if method == "cmaes":
        return r(base, sampler="cmaes", polish=0, baselines=None)
    if method == "gradient":
        return r(base, method="gradient", baselines=(), trials=1, **one)
    if method == "dp+gradient":
        return r(base, method="gradient", grad_init="dp", baselines=("dp",), trials=2, **one)
    raise ValueError(method)


def run_method(cfg: Any, model: Any, work: Path, name: str) -> dict[str, Any]:
    """Run one sweep in this process; its schedule, search wall time and counted model evaluations."""
    import optuna

    from pipeline.core.schedules import Schedule
    from pipeline.evaluation.inprocess import InProcessEvaluator
    from search.study import make_storage
    from search.sweep.run import run_sweep

    counted = counting(model)
    held, spent = cfg.holdout_seed_list, {"s": 0.0}

    class Timed:  # the sweep's own held-out table (one seed): not part of the method's cost
        def __init__(self, seeds):
            t0 = time.perf_counter()
            self.ev = InProcessEvaluator(model, seeds, cfg.teacher_nfe, solver=cfg.solver)
            spent["s"] += time.perf_counter() - t0

        def evaluate(self, schedules, solver=None):
            t0 = time.perf_counter()
            try:
                return self.ev.evaluate(schedules, solver)
            finally:
                spent["s"] += time.perf_counter() - t0

    def evaluators(seeds):
        seeds = [int(s) for s in seeds]
        return Timed(seeds) if seeds == held else InProcessEvaluator(counted, seeds, cfg.teacher_nfe, solver=cfg.solver)

    storage = str(work / f"{name}.journal")
    lines: list[str] = []
    res = run_sweep(cfg, study_name=name, storage=storage, out_dir=work / "out", track=False, model=counted,
                    evaluators=evaluators, figures=False, log=lines.append)
    best = res.best
    if cfg.method == "gradient":  # the gradient's own trial (dp+gradient's validation would also see dp)
        study = optuna.load_study(study_name=name, storage=make_storage(storage))
        t = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("kind") == "gradient"][0]
        best = Schedule(tuple(t.user_attrs["timesteps"]), model.num_train_timesteps, "gradient")
    return {"schedule": best, "wall_s": res.seconds - spent["s"], "model_evals": counted.denoiser.count,
            "trials": sum(res.counts.values()), "states": res.counts}


# --------------------------------------------------------------------------------------------------
# one cell = (solver, NFE)


def run_cell(model: Any, solver: str, nfe: int, plan: dict[str, Any], work: Path, log=print) -> list[dict[str, Any]]:
    """Every method at (solver, nfe), then the held-out table of the cell."""
    from pipeline.core.schedules import SCHEDULES, make_schedule
    from pipeline.errors import StridelabError
    from pipeline.interop.defaults import default_spacing
    from search.evaluators import EvaluatorFactory
    from search.sweep.config import SweepConfig

    base = SweepConfig(model=plan["model"], nfe=nfe, solver=solver, trials=plan["trials"], polish=plan["polish"],
                       num_seeds=plan["num_seeds"], validation_seeds=plan["validation_seeds"], holdout_seeds=1,
                       holdout_fid=False, teacher_nfe=plan["teacher_nfe"], grad_iters=plan["grad_iters"],
                       dp_seeds=plan["dp_seeds"], seed=0)
    abar, n = model.alphas_cumprod, base.steps
    rows: list[dict[str, Any]] = [{"method": "default", "kind": "baseline", "schedule": default_spacing(solver, n, abar)}]
    rows += [{"method": k, "kind": "baseline", "schedule": make_schedule(k, n, abar)} for k in SCHEDULES]
    for method in SEARCHED:
        tag = "".join(c if c.isalnum() else "-" for c in f"{solver}-{nfe}-{method}")
        try:
            cfg = method_config(base, method)
        except StridelabError as e:
            rows.append({"method": method, "kind": "searched", "schedule": None, "note": f"not supported: {e}"})
            log(f"  {method}: not supported ({e})")
            continue
        got = run_method(cfg, model, work, tag)
        rows.append({"method": method, "kind": "searched", **got})
        log(f"  {method}: {got['wall_s']:.1f} s, {got['model_evals']} model evaluations, {list(got['schedule'].timesteps)}")
    # held-out: the same seeds for every row and every cell
    seeds = dataclasses.replace(base, holdout_seeds=plan["holdout_seeds"]).holdout_seed_list
    factory = EvaluatorFactory(model, 0, None, base.teacher_nfe, fid=True, solver=solver, log=log)
    try:
        ev = factory(seeds)
        live = [r for r in rows if r.get("schedule") is not None]
        for r, res in zip(live, ev.evaluate([r["schedule"] for r in live])):
            r["per_seed"] = res.recon.double().cpu().numpy()
            r["holdout_recon"] = float(r["per_seed"].mean())
            r["holdout_fid"] = (res.extra or {}).get("fid")
    finally:
        factory.close()
    return [finish(r, solver, nfe) for r in ratios(rows)]


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add the ratio to the cell's best baseline and its paired 95% interval to every scored row."""
    from pipeline.metrics.recon import paired_ratio_interval

    best = min((r for r in rows if r["kind"] == "baseline"), key=lambda r: r["holdout_recon"])
    for r in rows:
        if "per_seed" in r:
            r["best_baseline"] = best["method"]
            r["x_best_baseline"] = r["holdout_recon"] / best["holdout_recon"]
            r["x_lo"], r["x_hi"] = paired_ratio_interval(r["per_seed"], best["per_seed"])
    return rows


def finish(r: dict[str, Any], solver: str, nfe: int) -> dict[str, Any]:
    """A JSON-ready row (`COLUMNS` plus the best baseline's name)."""
    s = r.get("schedule")
    out = {"solver": solver, "nfe": nfe, "method": r["method"], "kind": r["kind"],
           "timesteps": " ".join(map(str, s.timesteps)) if s is not None else None,
           "wall_s": r.get("wall_s", 0.0 if r["kind"] == "baseline" else None),
           "model_evals": r.get("model_evals", 0 if r["kind"] == "baseline" else None), "note": r.get("note")}
    for k in ("holdout_recon", "x_best_baseline", "x_lo", "x_hi", "holdout_fid", "best_baseline", "trials"):
        if k in r:
            out[k] = r[k]
    return out


# --------------------------------------------------------------------------------------------------
# the report


def verdict(rows: list[dict[str, Any]]) -> str:
    """One line: the searched method with the most held-out quality per wall-minute, and what beats the
    strongest baseline beyond its 95% interval."""
    scored = [r for r in rows if r["kind"] == "searched" and r.get("x_best_baseline") is not None]
    if not scored:
        return "verdict: no searched method was scored"
    by: dict[str, list[dict[str, Any]]] = {}
    for r in scored:
        by.setdefault(r["method"], []).append(r)
    cells = len({(r["solver"], r["nfe"]) for r in rows})

    def rate(rs):  # share of the best baseline's held-out error removed, per wall-minute of search
        gain = sum(max(0.0, 1 - r["x_best_baseline"]) for r in rs) / len(rs)
        minutes = max(sum(r["wall_s"] for r in rs) / len(rs) / 60, 1e-6)
        return gain / minutes, gain, minutes

    top = max(by, key=lambda m: rate(by[m])[0])
    _, gain, minutes = rate(by[top])
    wins = {m: sum(r["x_hi"] < 1 for r in rs) for m, rs in by.items()}
    beat = ", ".join(f"{m} in {k} of {len(by[m])}" for m, k in sorted(wins.items(), key=lambda kv: -kv[1]) if k)
    beyond = (f"beyond the 95% interval, these beat the strongest baseline of the cell: {beat}" if beat else
              "nothing beats the strongest baseline of any cell beyond its 95% interval")
    return (f"verdict: most held-out quality per wall-minute: {top} (it removes {gain:.0%} of the best baseline's "
            f"held-out recon error on average, in {minutes:.2f} min per cell, over {len(by[top])} of {cells} cells); "
            f"{beyond}.")


def merge(raws: list[dict[str, Any]]) -> dict[str, Any]:
    """Several saved runs as one: rows by (solver, NFE) cell, a later run's cell replacing an earlier's, in
    solver then NFE order; ``meta["runs"]`` keeps each run's own meta. The budgets must agree."""
    budgets = {r["meta"]["budget"] for r in raws} | {r["meta"].get("model") for r in raws}
    if len(budgets) != 2:
        raise SystemExit("bench_methods --merge-json: the runs have different budgets or models; rerun them together")
    cells: dict[tuple[str, int], list[dict[str, Any]]] = {}
    runs: list[dict[str, Any]] = []
    for raw in raws:
        for m in raw["meta"].get("runs", [raw["meta"]]):
            runs.append({k: v for k, v in m.items() if k != "runs"})
        by: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for r in raw["rows"]:
            by.setdefault((r["solver"], int(r["nfe"])), []).append(r)
        cells.update(by)
    solvers = list(dict.fromkeys(r["solver"] for raw in raws for r in raw["rows"]))
    rows = [r for key in sorted(cells, key=lambda k: (solvers.index(k[0]), k[1])) for r in cells[key]]
    meta = {**raws[-1]["meta"], "runs": runs, "nfes": ",".join(str(n) for n in sorted({k[1] for k in cells}))}
    return {"meta": meta, "columns": list(COLUMNS), "rows": rows}


def render(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    def g(v: Any, spec: str = ".3g") -> str:
        return "n/a" if v is None else format(v, spec)

    runs = meta.get("runs", [meta])  # `merge`: one header line per run whose cells the table holds

    def measured(m: dict[str, Any]) -> str:
        return (f"NFE {m['nfes']}: measured {m['date']} on {m['machine']} (load average {m['load']}); "
                f"`python benchmarks/bench_methods.py{' --quick' if m['mode'] == 'quick' else ''} --nfes {m['nfes']}`, "
                f"{m['wall_min']:.1f} min in all")

    lines = [BEGIN, "## Placement methods side by side (issue 13)", "",
             "; ".join(measured(m) for m in runs) + f". Budget: `{meta['budget']}`. Model {meta['model']}; the same "
             f"tuning seeds (0..{meta['num_seeds'] - 1}) and held-out seeds ({meta['holdout_seeds']} from 1000000) "
             f"in every cell, {meta['teacher_nfe']}-step DDIM teacher. Recon: per-dimension MSE on [0, 1] vs the "
             "teacher; ratio to the cell's best baseline with its paired 95% bootstrap interval; FID on the same "
             "held-out samples. Wall time and model evaluations are the search's (in one process on these cores; "
             "the teacher included, the gradient's backward passes not counted); baselines cost nothing.", "",
             "| solver | NFE | method | held-out recon | x best baseline [95%] | FID | wall s | model evals |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("note"):
            lines.append(f"| {r['solver']} | {r['nfe']} | {r['method']} | {r['note']} | | | | |")
            continue
        ratio = f"**{g(r.get('x_best_baseline'), '.3f')}** [{g(r.get('x_lo'), '.2f')}, {g(r.get('x_hi'), '.2f')}]"
        lines.append(f"| {r['solver']} | {r['nfe']} | {r['method']} | {g(r.get('holdout_recon'))} | {ratio} | "
                     f"{g(r.get('holdout_fid'), '.3f')} | {g(r.get('wall_s'), '.1f')} | {r.get('model_evals')} |")
    lines += ["", verdict(rows), "", END]
    return "\n".join(lines)


def write_section(text: str, path: Path = OUT) -> None:
    """Replace the section between `BEGIN` and `END` of `path` (append it when absent), atomically."""
    from pipeline.io.reports import replace_section

    replace_section(path, text, BEGIN, END)



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_report_args(p, "bench_methods.json")
    add_budget_args(p, FULL, QUICK)
    p.add_argument("--merge-json", nargs="+", default=None, metavar="F",
                   help="combine saved runs (same budget; a later file's cells replace an earlier's) into --json and "
                        "the report section, e.g. NFE 10 and NFE 5 measured on different days")
    args = p.parse_args(argv)
    if args.merge_json:
        from pipeline.io.files import atomic_write_json

        missing = [f for f in args.merge_json if not Path(f).is_file()]
        if missing:
            raise SystemExit(f"bench_methods --merge-json: no such file: {', '.join(missing)}")
        raw = merge([json.loads(Path(f).read_text()) for f in args.merge_json])
        atomic_write_json(Path(args.json) if args.json else RAW, raw)
        write_section(render(raw["rows"], raw["meta"]), Path(args.doc) if args.doc else OUT)
        return 0
    if args.from_json:
        raw = json.loads(Path(args.from_json).read_text())
        write_section(render(raw["rows"], raw["meta"]), Path(args.doc) if args.doc else OUT)
        return 0
    from pipeline.io.files import atomic_write_json
    from pipeline.models.load import load_model

    plan = budget_plan(args, FULL, QUICK)
    budget = " ".join(f"--{k.replace('_', '-')} {plan[k]}" for k in FULL if k not in ("model", "solvers", "nfes"))
    print(f"bench_methods: {plan['model']}, solvers {plan['solvers']}, NFE {plan['nfes']}; budget {budget}", flush=True)
    t0, load0 = time.perf_counter(), load_averages()
    model = load_model(plan["model"])
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="stridelab-methods-") as tmp:
        for solver in plan["solvers"].split(","):
            for nfe in (int(v) for v in plan["nfes"].split(",")):
                print(f"{solver} NFE {nfe}:", flush=True)
                rows += run_cell(model, solver, nfe, plan, Path(tmp))
    meta = {"date": dt.date.today().isoformat(), "mode": "quick" if args.quick else "full", "machine": machine(),
            "load": f"{load0} at the start, {load_averages()} at the end", "wall_min": (time.perf_counter() - t0) / 60,
            "budget": budget, **plan}
    json_path, doc = report_paths(args, RAW, OUT)
    if json_path:
        atomic_write_json(Path(json_path), {"meta": meta, "columns": list(COLUMNS), "rows": rows})
    text = render(rows, meta)
    if doc:
        write_section(text, Path(doc))
    print(text)
    return 0



if __name__ == "__main__":
    raise SystemExit(main())
