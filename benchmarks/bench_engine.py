"""The engine side by side: one TPE search run by Ray Tune's Optuna pattern and by stridelab's resident actors.

    python benchmarks/bench_engine.py            # full: bundled:digits, NFE 10, 40 trials (8.5 min on 2 shared cores)
    python benchmarks/bench_engine.py --quick    # gmm:ring8, 8 trials: a test-sized run of the same code
    python benchmarks/bench_engine.py --from-json F

Both engines run the same search: the same space (`search.space`, define-by-run), the same objective (held-in
recon vs the many-step DDIM teacher on the same tuning seeds), the same TPE sampler
(`search.study.make_sampler`, same seed), the same trial budget, `--parallel` trials at a time on the same
local Ray (``num_cpus`` = `--cpus`), no warm starts, no polish, no validation:

1. **Ray Tune**, as its documentation shows it: ``tune.Tuner(trainable, tune_config=tune.TuneConfig(
   search_alg=OptunaSearch(space, metric, mode, sampler), num_samples=N, max_concurrent_trials=k),
   param_space={})`` with a function trainable per trial that loads the model and scores one schedule. The
   teacher is computed once in the driver and shared through ``tune.with_parameters`` (the object store), so
   Tune is not charged for recomputing it per trial.
2. **stridelab**: `search.sweep.run_sweep` with ``prune=False`` (the same work per trial) and `--parallel`
   resident `SamplerPool` actors that load the model and compute their teacher shard once.
3. **stridelab with pruning** (the sweep's default Wilcoxon screen; skip with ``--no-pruned``): what the screen
   adds on top of the resident actors.

Figures, as ratios measured in this one run: trials per minute of each engine, and the wall time for each to
reach the same best value: the worse of the engines' final bests (the first moment each engine's running best
is at least that good). Clocks start when the engine is called (Ray already up) and include everything it
does: Tune's trial launches and model loads, stridelab's actor start-up and teachers. Writes
docs/bench_engine.json and the section between ``<!-- engine -->`` markers of docs/BENCHMARKS.md (atomically).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from budget import add_budget_args, add_report_args, budget_plan, load_averages, report_paths  # noqa: E402  (beside this file)

OUT = ROOT / "docs" / "BENCHMARKS.md"
RAW = ROOT / "docs" / "bench_engine.json"
BEGIN, END = "<!-- engine -->", "<!-- /engine -->"

FULL = {"model": "bundled:digits", "solver": "ddim", "nfe": 10, "space": "warp", "trials": 40, "parallel": 2,
        "cpus": 2, "num_seeds": 128, "teacher_nfe": 250, "seed": 0}
QUICK = {"model": "gmm:ring8", "solver": "ddim", "nfe": 5, "space": "warp", "trials": 8, "parallel": 2,
         "cpus": 2, "num_seeds": 16, "teacher_nfe": 60, "seed": 0}


# --------------------------------------------------------------------------------------------------
# engine 1: Ray Tune + OptunaSearch


def tune_trainable(config: dict[str, Any], plan: dict[str, Any], x_T: Any, x0: Any, teacher_ts: tuple[int, ...]) -> None:
    """One Tune trial: load the model, build the schedule the search asked for, score it, report."""
    from ray import tune

    from pipeline.evaluation.inprocess import evaluate_shard
    from pipeline.models.load import load_model
    from search.space import make_space

    model = load_model(plan["model"])
    steps = steps_of(plan)
    sched = make_space(plan["space"], steps, model.alphas_cumprod).build(config)
    m = evaluate_shard(model.denoiser, model.alphas_cumprod, model.to_unit, sched.timesteps, x_T, x0, teacher_ts,
                       solver=plan["solver"])
    tune.report({"recon": float(m.recon.double().mean()), "t_done": time.time()})


def steps_of(plan: dict[str, Any]) -> int:
    from pipeline.solvers.registry import get_solver

    return get_solver(plan["solver"]).steps_for_budget(plan["nfe"])


class DefineByRun:
    """OptunaSearch's define-by-run space: the project's own space asks the trial for its parameters (a class,
    not a closure: Tune pickles its searcher's state)."""

    def __init__(self, space: Any):
        self.space = space

    def __call__(self, trial: Any) -> None:
        self.space.suggest(trial)


def run_tune(plan: dict[str, Any], work: Path) -> dict[str, Any]:
    """The search through ``tune.Tuner`` with ``OptunaSearch``; each trial's value and completion time."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from pipeline.evaluation.inprocess import make_teacher
    from pipeline.models.load import load_model
    from search.space import make_space
    from search.study import make_sampler

    t0 = time.time()
    model = load_model(plan["model"])
    space = make_space(plan["space"], steps_of(plan), model.alphas_cumprod)
    teacher = make_teacher(model, list(range(plan["seed"], plan["seed"] + plan["num_seeds"])), plan["teacher_nfe"])

    search = OptunaSearch(space=DefineByRun(space), metric="recon", mode="min", sampler=make_sampler("tpe", plan["seed"]))
    trainable = tune.with_resources(
        tune.with_parameters(tune_trainable, plan=plan, x_T=teacher.x_T, x0=teacher.x0, teacher_ts=teacher.timesteps),
        {"cpu": plan["cpus"] / plan["parallel"]})
    tuner = tune.Tuner(trainable, param_space={},
                       tune_config=tune.TuneConfig(search_alg=search, num_samples=plan["trials"],
                                                   max_concurrent_trials=plan["parallel"]),
                       run_config=tune.RunConfig(storage_path=str(work / "tune"), name="engine", verbose=0))
    grid = tuner.fit()
    done = [r.metrics for r in grid if r.error is None and r.metrics and "recon" in r.metrics]
    return {"values": [d["recon"] for d in done], "times": [d["t_done"] - t0 for d in done],
            "failed": sum(r.error is not None for r in grid)}


# --------------------------------------------------------------------------------------------------
# engine 2: stridelab's sweep on resident actors


def run_stridelab(plan: dict[str, Any], work: Path, prune: bool) -> dict[str, Any]:
    """The search through `run_sweep` on `parallel` resident actors; each finished trial's value and time."""
    import optuna

    from search.study import make_storage
    from search.sweep.config import SweepConfig
    from search.sweep.run import run_sweep

    cfg = SweepConfig(model=plan["model"], nfe=plan["nfe"], solver=plan["solver"], space=plan["space"],
                      trials=plan["trials"], parallel=plan["parallel"], sampler="tpe", num_seeds=plan["num_seeds"],
                      teacher_nfe=plan["teacher_nfe"], seed=plan["seed"], baselines=(), prune=prune, polish=0,
                      validation_seeds=0, holdout_seeds=1, holdout_fid=False)
    name = f"engine-{'prune' if prune else 'noprune'}"
    storage = str(work / f"{name}.journal")
    t0 = time.time()
    run_sweep(cfg, study_name=name, storage=storage, out_dir=work / "out", track=False, actors=plan["parallel"],
              figures=False, log=lambda s: None)
    study = optuna.load_study(study_name=name, storage=make_storage(storage))
    trials = [t for t in study.get_trials(deepcopy=False) if t.datetime_complete is not None]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    return {"values": [t.value for t in complete], "times": [t.datetime_complete.timestamp() - t0 for t in complete],
            "finished_times": sorted(t.datetime_complete.timestamp() - t0 for t in trials),
            "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in trials),
            "failed": sum(t.state == optuna.trial.TrialState.FAIL for t in trials)}


# --------------------------------------------------------------------------------------------------
# figures


def time_to(values: list[float], times: list[float], target: float) -> float | None:
    """The first time the running best of the (value, time) pairs is <= `target` (None: never)."""
    for v, t in sorted(zip(values, times), key=lambda vt: vt[1]):
        if v <= target:
            return t
    return None


def summarise(runs: dict[str, dict[str, Any]], trials: int) -> dict[str, Any]:
    """Per engine: wall time, trials per minute, best value, time to the common target; and the ratios."""
    target = max(min(r["values"]) for r in runs.values())  # the worse of the engines' bests
    out: dict[str, Any] = {"target": target, "engines": {}}
    for name, r in runs.items():
        wall = max(r.get("finished_times") or r["times"])
        out["engines"][name] = {"wall_s": wall, "trials_per_min": trials / wall * 60, "best": min(r["values"]),
                                "to_target_s": time_to(r["values"], r["times"], target),
                                "complete": len(r["values"]), "pruned": r.get("pruned", 0), "failed": r["failed"],
                                "load_at_start": r.get("load_at_start")}
    e = out["engines"]
    tune_e, ours = e["ray tune"], e["stridelab"]
    out["ratios"] = {"trials_per_min_stridelab_over_tune": ours["trials_per_min"] / tune_e["trials_per_min"],
                     "to_target_tune_over_stridelab": tune_e["to_target_s"] / ours["to_target_s"]}
    if "stridelab (pruning)" in e:
        p = e["stridelab (pruning)"]
        out["ratios"]["trials_per_min_pruning_over_tune"] = p["trials_per_min"] / tune_e["trials_per_min"]
        out["ratios"]["to_target_tune_over_pruning"] = (tune_e["to_target_s"] / p["to_target_s"]
                                                        if p["to_target_s"] else None)
    return out


def _sooner(x: float) -> str:
    """``2.00x sooner`` for a time ratio (theirs / ours) of 2, ``1.25x later`` for 0.8."""
    return f"{x:.2f}x sooner" if x >= 1 else f"{1 / x:.2f}x later"


def verdict(s: dict[str, Any]) -> str:
    r = s["ratios"]
    line = (f"verdict: stridelab's resident actors run {r['trials_per_min_stridelab_over_tune']:.2f}x Ray Tune's trials "
            f"per minute and reach the common best ({s['target']:.4g}) {_sooner(r['to_target_tune_over_stridelab'])} "
            "(same search, no pruning)")
    if "trials_per_min_pruning_over_tune" in r:
        tt = r["to_target_tune_over_pruning"]
        line += (f"; with its pruning screen, {r['trials_per_min_pruning_over_tune']:.2f}x the trials per minute and "
                 + (f"the common best {_sooner(tt)}" if tt else
                    "the common best never reached (a pruned trial has no value, so other trials are asked)"))
    return line + "."


def render(s: dict[str, Any], meta: dict[str, Any]) -> str:
    def g(v: Any, spec: str = ".3g") -> str:
        return "n/a" if v is None else format(v, spec)

    lines = [BEGIN, "## The engine side by side: Ray Tune + OptunaSearch vs resident actors (issue 13)", "",
             f"Measured {meta['date']} on {meta['machine']} (load average {meta['load']}); "
             f"`python benchmarks/bench_engine.py{' --quick' if meta['mode'] == 'quick' else ''}`, "
             f"{meta['wall_min']:.1f} min in all. One TPE search (seed {meta['seed']}, space {meta['space']}), "
             f"{meta['trials']} trials, {meta['parallel']} at a time on a local Ray with {meta['cpus']} CPUs, "
             f"{meta['model']} {meta['solver']} NFE {meta['nfe']}, objective recon on tuning seeds "
             f"0..{meta['num_seeds'] - 1} vs a {meta['teacher_nfe']}-step DDIM teacher. Ray Tune: a function trainable "
             "per trial that loads the model (the teacher shared once through `tune.with_parameters`); stridelab: "
             "`run_sweep` on resident actors. Target = the worse of the engines' best values "
             f"({s['target']:.4g}). The same sampler seed does not give the same trials: the sweep re-seeds its "
             "sampler before each batch from the study's history (so that a resumed sweep asks what an undisturbed "
             "one would), Tune keeps one sampler; the best values differ for that reason.", "",
             "| engine | wall s | trials / min | best recon | s to target | complete / pruned / failed | load at start |",
             "|---|---|---|---|---|---|---|"]
    for name, e in s["engines"].items():
        lines.append(f"| {name} | {e['wall_s']:.1f} | {e['trials_per_min']:.1f} | {e['best']:.4g} | "
                     f"{g(e['to_target_s'], '.1f')} | {e['complete']} / {e['pruned']} / {e['failed']} | "
                     f"{e.get('load_at_start', 'n/a')} |")
    lines += ["", "Ratios (this run): " + ", ".join(f"{k} **{g(v, '.2f')}**" for k, v in s["ratios"].items()), "",
              verdict(s), "", END]
    return "\n".join(lines)


def write_section(text: str, path: Path = OUT) -> None:
    """Replace the section between `BEGIN` and `END` of `path` (append it when absent), atomically."""
    from pipeline.io.reports import replace_section

    replace_section(path, text, BEGIN, END)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_report_args(p, "bench_engine.json", quick_help="gmm:ring8, 8 trials: a test-sized run of the same code")
    p.add_argument("--no-pruned", action="store_true", help="skip the third run (stridelab with its pruning screen)")
    add_budget_args(p, FULL, QUICK)
    args = p.parse_args(argv)
    if args.from_json:
        raw = json.loads(Path(args.from_json).read_text())
        write_section(render(raw["summary"], raw["meta"]), Path(args.doc) if args.doc else OUT)
        return 0
    import ray

    from pipeline.io.files import atomic_write_json

    plan = budget_plan(args, FULL, QUICK)
    print(f"bench_engine: {plan}", flush=True)
    t0, load0 = time.perf_counter(), load_averages()
    runs: dict[str, dict[str, Any]] = {}
    # the trials' and actors' processes import the project (and, for Tune's trainable, this module) by name
    paths = [str(ROOT), str(ROOT / "benchmarks"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    ray.init(address="local", num_cpus=plan["cpus"], include_dashboard=False, log_to_driver=False,
             logging_level="error")
    try:
        with tempfile.TemporaryDirectory(prefix="stridelab-engine-") as tmp:
            engines = {"ray tune": lambda: run_tune(plan, Path(tmp)),
                       "stridelab": lambda: run_stridelab(plan, Path(tmp), prune=False)}
            if not args.no_pruned:
                engines["stridelab (pruning)"] = lambda: run_stridelab(plan, Path(tmp), prune=True)
            for name, run in engines.items():
                load = load_averages()  # the engines run one after another: a busy machine can favour one of them
                runs[name] = {**run(), "load_at_start": load}
                print(f"  {name}: {max(runs[name].get('finished_times') or runs[name]['times']):.1f} s "
                      f"(load average {load} at its start)", flush=True)
    finally:
        ray.shutdown()
    summary = summarise(runs, plan["trials"])
    meta = {"date": dt.date.today().isoformat(), "mode": "quick" if args.quick else "full",
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "load": f"{load0} at the start, {load_averages()} at the end",
            "wall_min": (time.perf_counter() - t0) / 60, **plan}
    json_path, doc = report_paths(args, RAW, OUT)
    if json_path:
        atomic_write_json(Path(json_path), {"meta": meta, "summary": summary, "runs": runs})
    text = render(summary, meta)
    if doc:
        write_section(text, Path(doc))
    print(text)
    return 0



if __name__ == "__main__":
    raise SystemExit(main())
