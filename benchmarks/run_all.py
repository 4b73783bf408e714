"""Every benchmark of issue 7 in one run; writes docs/BENCHMARKS.md (atomically) with the machine and date.

    python benchmarks/run_all.py            # full: what `make bench` runs (long on 2 cores)
    python benchmarks/run_all.py --quick    # smoke run: tiny budgets, same code paths, a few minutes

Sections (ratios are measured within this one run; absolute times hold only for the hardware named):

1. Sampler: ``ddim_sample`` time / raw model calls (target <= 1.03) and / diffusers' DDIM loop at equal NFE
   and equal outputs (target <= 1.0): `bench_sampler.main`.
2. Ray actor pool vs in-process throughput on the same cores (target >= 0.9): `bench_pool.main`.
3. Search quality for each NFE (default 5, 10, 20): a real ``stridelab sweep`` subprocess per NFE (the
   default sweep but for the budget flags), learned schedule vs every baseline on held-out seeds (recon
   and FID), read from the sweep's ``comparison.csv``.
4. Search cost, from the same sweeps' Optuna journals: wall time; trials (and time) until the best-so-far
   is within 5% of the final best; time per search trial / the sampling time measured inside it
   (``ScheduleResult.seconds``, logged as the trial's ``seconds``; target <= 1.2), over the batches in
   which no trial was pruned or failed (a pruned trial's screen time is not logged).
5. Peak memory of each sweep: the summed RSS (and PSS) of the driver and every process under it (the
   local Ray's GCS, raylet and workers), sampled every 0.25 s (PSS every 2 s) with psutil.

``--quick`` sweeps the analytic ``gmm:blobs64`` (seconds per sweep instead of many minutes for the
bundled digits UNet on 2 cores) unless ``--model`` is given; the sampler benchmark uses the tiny random
UNet. The full run uses the sweep's defaults (model, trials, seeds, teacher) unless flags say otherwise:
about half an hour on 2 idle cores.

Everything a sweep writes (journal, sqlite MLflow, artifacts) goes to a temporary directory.
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
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

OUT = ROOT / "docs" / "BENCHMARKS.md"
WITHIN = 0.05  # "within 5% of the final best"


# --------------------------------------------------------------------------------------------------
# the machine


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) / 2**20  # kB -> GiB
    except OSError:
        pass
    import ray

    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": ram, "torch": torch.__version__, "ray": ray.__version__,
            "python": platform.python_version(), "os": f"{platform.system()} {platform.release()}",
            "load_avg": os.getloadavg(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


# --------------------------------------------------------------------------------------------------
# peak memory of a process tree


class PeakMemory:
    """Samples the summed RSS (every `interval` s) and PSS (every `pss_every`-th sample: reading smaps costs
    kernel time) of a process and all its descendants in a thread; keeps the maxima."""

    def __init__(self, pid: int, interval: float = 0.25, pss_every: int = 8):
        import ray  # noqa: F401  (puts Ray's bundled psutil on sys.path)
        import psutil

        self.psutil, self.root = psutil, psutil.Process(pid)
        self.interval, self.pss_every = interval, pss_every
        self.peak_rss = self.peak_pss = self.driver_rss = 0
        self.peak_procs = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        ps = self.psutil
        n = 0
        while not self._stop.is_set():
            n += 1
            full = n % self.pss_every == 1
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except ps.Error:
                break
            rss = pss = 0
            for i, p in enumerate(procs):
                try:
                    m = p.memory_full_info() if full else p.memory_info()
                except ps.Error:
                    continue
                rss += m.rss
                pss += getattr(m, "pss", m.rss)
                if i == 0:
                    self.driver_rss = max(self.driver_rss, m.rss)
            self.peak_rss = max(self.peak_rss, rss)
            if full:
                self.peak_pss = max(self.peak_pss, pss)
            self.peak_procs = max(self.peak_procs, len(procs))
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()


# --------------------------------------------------------------------------------------------------
# sweeps


def run_sweep_subprocess(nfe: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One ``stridelab sweep`` in its own process, memory sampled; returns its figures."""
    name = f"bench-nfe{nfe}"
    cmd = [sys.executable, "-m", "jobs.cli", "sweep", "--model", args.model, "--nfe", str(nfe),
           "--trials", str(args.trials), "--study-name", name, "--out-dir", str(work / "out"),
           "--storage", str(work / "optuna.journal"), "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}",
           "--actors", str(args.actors)]
    for flag, value in (("--num-seeds", args.num_seeds), ("--holdout-seeds", args.holdout_seeds),
                        ("--teacher-nfe", args.teacher_nfe), ("--parallel", args.parallel)):
        if value is not None:
            cmd += [flag, str(value)]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    log_path = work / f"{name}.log"
    print(f"  sweep nfe {nfe}: {' '.join(cmd[3:])}", flush=True)
    t0, launched = time.perf_counter(), dt.datetime.now(dt.timezone.utc)
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
        with PeakMemory(proc.pid) as mem:
            rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"sweep nfe {nfe} failed (exit {rc}):\n{log_path.read_text()[-3000:]}")
    out = {"nfe": nfe, "cmd": " ".join(["stridelab", *cmd[3:]]), "wall_s": wall, "peak_rss": mem.peak_rss,
           "peak_pss": mem.peak_pss, "driver_rss": mem.driver_rss, "peak_procs": mem.peak_procs}
    out["rows"] = read_rows(work / "out" / name / "comparison.csv")
    from search.defaults import DEFAULTS

    num_seeds = args.num_seeds or DEFAULTS["num_seeds"]
    n_screen = DEFAULTS["screen_seeds"] or max(8, num_seeds // 4)
    out["cost"] = search_cost(work / "optuna.journal", name, launched, args.parallel or DEFAULTS["parallel"],
                              num_seeds, n_screen)
    print(f"    {wall:.0f} s, peak RSS {mem.peak_rss / 2**30:.2f} GiB, "
          f"time/trial over sampling {fmt(out['cost'].get('overhead'), '.2f')}", flush=True)
    return out


def read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open() as f:
        for r in csv.DictReader(f):
            rows.append({k: (float(v) if k.startswith(("holdout_", "x_", "fid_x", "fid_gap", "tuning_")) and v not in ("", None)
                             else v) for k, v in r.items()})
    return rows


def search_cost(journal: Path, name: str, launched: dt.datetime, parallel: int, num_seeds: int,
                n_screen: int) -> dict[str, Any]:
    """Trials to within 5% of the final best, and search wall time / sampling time, from the study.

    Search trials are asked in batches of `parallel` (consecutive numbers after the warm starts). A batch's
    wall time runs from its first ask to the next batch's first ask, so the tell and MLflow logging after
    it count. Its sampling time is the sum of its trials' ``seconds`` (measured inside the evaluator; a
    pruned trial logs the time of its screen). Studies written before pruned trials logged it get
    n_screen x the study's mean sampling time per seed (every schedule of one NFE costs the same per seed:
    NFE network calls). Batches holding a FAIL trial are left out. Search trials are those of the global
    phase (``kind = search``) and of the polish phase (``kind = polish``).
    """
    import optuna
    from optuna.trial import TrialState

    from search.study import make_storage

    study = optuna.load_study(study_name=name, storage=make_storage(journal))
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.values]
    final = min(t.values[0] for t in done)
    best, reach = float("inf"), None
    for i, t in enumerate(trials, 1):
        if t.state == TrialState.COMPLETE and t.values:
            best = min(best, t.values[0])
        if best <= (1 + WITHIN) * final:
            reach = (i, (t.datetime_complete.astimezone(dt.timezone.utc) - launched).total_seconds())
            break
    search = [t for t in trials if t.user_attrs.get("kind") in ("search", "polish")]
    batches = [search[i : i + parallel] for i in range(0, len(search), parallel)]
    timed = [t for t in search if t.state == TrialState.COMPLETE and "seconds" in t.user_attrs]
    per_seed = sum(float(t.user_attrs["seconds"]) for t in timed) / (len(timed) * num_seeds) if timed else None
    wall = sampling = 0.0
    used = 0
    for b, nxt in zip(batches, [*batches[1:], None]):
        if per_seed is None or any(t.state not in (TrialState.COMPLETE, TrialState.PRUNED) for t in b):
            continue
        end = nxt[0].datetime_start if nxt is not None else max(t.datetime_complete for t in b)
        wall += (end - b[0].datetime_start).total_seconds()
        sampling += sum(float(t.user_attrs["seconds"]) if "seconds" in t.user_attrs else n_screen * per_seed
                        for t in b)
        used += 1
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    best_trial = min(done, key=lambda t: t.values[0])
    return {"trials": len(trials), "states": states, "final_best": final,
            "best_is": best_trial.user_attrs.get("schedule", "?") if best_trial.user_attrs.get("kind") == "baseline"
            else f"learned (trial {best_trial.number})",
            "reach_trials": reach[0] if reach else None, "reach_s": reach[1] if reach else None,
            "search_s": (max(t.datetime_complete for t in search) - search[0].datetime_start).total_seconds()
            if search else 0.0,
            "batches": len(batches), "batches_used": used, "batch_wall_s": wall, "batch_sampling_s": sampling,
            "sampling_per_seed_s": per_seed, "overhead": wall / sampling if sampling > 0 else None}


# --------------------------------------------------------------------------------------------------
# the report


def fmt(v: Any, spec: str = ".3g", none: str = "n/a") -> str:
    if v is None or v == "":
        return none
    try:
        return format(float(v), spec)
    except (TypeError, ValueError):
        return str(v)


def verdict(v: float | None, target: float, le: bool = True) -> str:
    if v is None:
        return "n/a"
    return "meets" if (v <= target if le else v >= target) else "misses"


def report(m: dict[str, Any], args: argparse.Namespace, argv: list[str], sampler: dict | None, pool: dict | None,
           sweeps: list[dict]) -> str:
    """docs/BENCHMARKS.md from the raw figures: the machine, then one section per measurement."""
    sections = [
        ("## 1. Sampler overhead and ours vs diffusers\n", _sampler_section(sampler) if sampler else None),
        ("## 2. Ray actor pool vs in-process\n", _pool_section(pool) if pool else None),
        ("## 3. Search quality on held-out seeds\n", _quality_section(sweeps, args) if sweeps else None),
        ("## 4. Search cost\n", _cost_section(sweeps) if sweeps else None),
        ("## 5. Peak memory of a sweep\n", _memory_section(sweeps, args) if sweeps else None),
    ]
    lines = _header(m, args, argv)
    for title, body in sections:
        lines += [title, *(body if body is not None else ["skipped\n"])]
    return "\n".join(lines) + "\n"


def _header(m: dict[str, Any], args: argparse.Namespace, argv: list[str]) -> list[str]:
    """Title, how the report was made, and the machine table."""
    quick = "**Quick smoke run: tiny budgets, the figures are not representative.**" if args.quick else ""
    return [
        "# Benchmarks\n",
        f"Generated by `python benchmarks/run_all.py{' ' + ' '.join(argv) if argv else ''}` (`make bench` runs it "
        f"without flags) on {m['date']}. {quick}\n",
        "| machine | |\n|---|---|",
        f"| CPU | {m['cpu']}, {m['cores']} cores |",
        f"| RAM | {fmt(m['ram_gib'], '.1f')} GiB |",
        f"| software | Python {m['python']}, torch {m['torch']}, Ray {m['ray']}, {m['os']} |",
        f"| load average at start | {' '.join(f'{v:.2f}' for v in m['load_avg'])} "
        f"(a shared machine: other jobs compete for the cores) |\n",
        "Ratios are measured within this run (contenders interleaved or on the same cores back to back); absolute "
        "times hold only for the machine above and its load.\n",
    ]


def _sampler_section(sampler: dict[str, Any]) -> list[str]:
    """Section 1: `benchmarks/bench_sampler.py`'s ratios against their targets."""
    lines = [
        f"Model `{sampler['model']}`, batch {sampler['batch']}, NFE {sampler['nfe']}, medians of "
        f"{sampler.get('reps', '?')} interleaved reps (`benchmarks/bench_sampler.py`).\n",
        "| measure | value | target | |\n|---|---|---|---|",
        f"| `ddim_sample` / raw model calls | {sampler['overhead']:.3f} | <= 1.03 | {verdict(sampler['overhead'], 1.03)} |",
        f"| `ddim_sample` / diffusers DDIM loop (same outputs) | {sampler['ours_over_diffusers']:.3f} | <= 1.0 | "
        f"{verdict(sampler['ours_over_diffusers'], 1.0)} |",
        f"| raw model calls, absolute | {sampler['raw_s']:.3f} s | | |",
    ]
    if sampler.get("math_fraction") is not None:
        lines.append(f"| DDIM arithmetic alone / raw model calls | {100 * sampler['math_fraction']:.3f}% | | |")
    lines.append("\nThe two wall-time ratios compare runs that differ by a few percent; on a shared machine they swing "
                 "by +-10% (occasionally more) from run to run. The arithmetic fraction (the sampler's own work timed "
                 "alone) is the figure load cannot blur.\n")
    return lines


def _pool_section(pool: dict[str, Any]) -> list[str]:
    """Section 2: `benchmarks/bench_pool.py`'s throughput, in-process vs the Ray pool."""
    model = pool['model'] if not pool['model'].startswith('/') else 'tiny random UNet (8x8)'
    return [
        f"`SamplerPool.evaluate` of {pool['schedules']} schedules x NFE {pool['nfe']} x {pool['seeds']} seeds on "
        f"`{model}`; in-process with "
        f"{pool['threads_in_process']} torch threads vs {pool['actors']} actors x 1 thread, median of {pool['reps']} "
        f"(`benchmarks/bench_pool.py`).\n",
        "| | seconds | samples/s |\n|---|---|---|",
        f"| in-process | {pool['in_process_s']:.3f} | {pool['in_process_samples_per_s']:.0f} |",
        f"| Ray pool | {pool['pool_s']:.3f} | {pool['pool_samples_per_s']:.0f} |\n",
        f"Pool / in-process throughput: **{pool['ratio']:.2f}** (target >= 0.9: {verdict(pool['ratio'], 0.9, le=False)}).\n",
    ]


def _quality_section(sweeps: list[dict], args: argparse.Namespace) -> list[str]:
    """Section 3: one summary row per NFE, the stretch goal, and every schedule's row per NFE."""
    lines = [
        f"One `stridelab sweep` per NFE on `{args.model}` (commands below); the learned schedule and every warm "
        "start re-evaluated on held-out seeds. recon: per-dimension MSE vs the teacher on a [0, 1] scale; "
        "/ best: ratio to the best standard baseline (dp excluded), for recon and FID separately (the best in "
        "FID need not be the best in recon); FID on the sweep's feature space. The teacher's FID on the same "
        "seeds is the floor no schedule can go below (with a few hundred samples FID's bias is most of it); "
        "gap / best: (FID - floor) / (best baseline FID - floor), the share of the best baseline's distance to "
        "the teacher that is left.\n",
        "| NFE | learned recon | best baseline (recon) | its recon | recon / best | learned FID | best baseline FID "
        "| FID / best | teacher FID (floor) | gap / best |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_quality_row(s) for s in sweeps]
    lines.append("")
    lines += _stretch_lines(sweeps)
    for s in sweeps:
        lines += _schedule_details(s)
    return lines


def _quality_row(s: dict[str, Any]) -> str:
    """One NFE's summary: the learned schedule against the best standard baseline (dp and the teacher excluded)."""
    rows = s["rows"]
    learned = rows[0]
    base = [r for r in rows[1:] if r["schedule"] not in ("dp", "dp_free") and not r["schedule"].startswith("teacher")
            and isinstance(r.get("holdout_recon"), float)]
    b = min(base, key=lambda r: r["holdout_recon"]) if base else {}
    fids = [r["holdout_fid"] for r in base if isinstance(r.get("holdout_fid"), float)]
    teacher = next((r for r in rows if r["schedule"].startswith("teacher")), {})
    return (f"| {s['nfe']} | {fmt(learned.get('holdout_recon'))} | {b.get('schedule', 'n/a')} | "
            f"{fmt(b.get('holdout_recon'))} | **{fmt(learned.get('x_best_baseline'), '.3f')}** | "
            f"{fmt(learned.get('holdout_fid'))} | {fmt(min(fids) if fids else None)} | "
            f"**{fmt(learned.get('fid_x_best_baseline'), '.3f')}** | {fmt(teacher.get('holdout_fid'))} | "
            f"{fmt(learned.get('fid_gap_x_best_baseline'), '.2f')} |")


def _stretch_lines(sweeps: list[dict]) -> list[str]:
    """The stretch goal for every NFE pair (n, 2n): learned at n at least as good in FID as uniform at 2n."""
    lines = []
    by_nfe = {s["nfe"]: s["rows"] for s in sweeps}
    for lo, hi in ((n, 2 * n) for n in sorted(by_nfe) if 2 * n in by_nfe):
        uni = next((r for r in by_nfe[hi] if r["schedule"] == "uniform"), {})
        lf, uf = by_nfe[lo][0].get("holdout_fid"), uni.get("holdout_fid")
        if isinstance(lf, float) and isinstance(uf, float):
            lines.append(f"Stretch (learned NFE {lo} at least as good in FID as uniform NFE {hi}, same held-out seeds): "
                         f"{lf:.3g} vs {uf:.3g}: **{'met' if lf <= uf else 'not met'}**.\n")
    return lines


def _schedule_details(s: dict[str, Any]) -> list[str]:
    """One NFE's held-out table, every schedule, folded."""
    from pipeline.io.reports import short_steps

    lines = [f"<details><summary>NFE {s['nfe']}: every schedule</summary>\n",
             "| schedule | held-out recon | x best | held-out FID | FID x best | FID gap x best | tuning recon | timesteps |",
             "|---|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        steps = short_steps(r.get("timesteps", ""), 24)
        lines.append(f"| {r['schedule']} | {fmt(r.get('holdout_recon'))} | {fmt(r.get('x_best_baseline'), '.3f')} | "
                     f"{fmt(r.get('holdout_fid'))} | {fmt(r.get('fid_x_best_baseline'), '.3f')} | "
                     f"{fmt(r.get('fid_gap_x_best_baseline'), '.2f')} | {fmt(r.get('tuning_recon'))} | {steps} |")
    lines.append("\n</details>\n")
    return lines


def _cost_section(sweeps: list[dict]) -> list[str]:
    """Section 4: how soon each sweep got within `WITHIN` of its best, and the search's overhead over sampling."""
    lines = [
        f"Within {WITHIN:.0%}: the first trial (in study order; the warm starts, baselines and dp, come first) "
        "after which the best-so-far tuning objective is within 5% of the final best, and the time from "
        "launching the sweep (start-up, teachers and the DP placement included) to that trial's end. "
        "Time per trial / sampling: the wall time of the search batches (ask to next ask: Optuna, schedule "
        "building, dispatch to the actors, tell, MLflow) over the sampling time measured inside the evaluator "
        "(`ScheduleResult.seconds`) for their trials, a pruned trial's screen included (target <= 1.2). Search "
        "trials: the global phase and the polish phase.\n",
        "| NFE | sweep wall | search phase | trials | states | within 5% after | at | best is | "
        "time per trial / sampling | batches |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in sweeps:
        c = s["cost"]
        lines.append(f"| {s['nfe']} | {s['wall_s']:.0f} s | {c['search_s']:.1f} s | {c['trials']} | "
                     f"{', '.join(f'{k} {v}' for k, v in sorted(c['states'].items()))} | {fmt(c['reach_trials'], 'd')} | "
                     f"{fmt(c['reach_s'], '.1f')} s | {c['best_is']} | **{fmt(c['overhead'], '.2f')}** "
                     f"({verdict(c['overhead'], 1.2)}) | {c['batches_used']} / {c['batches']} |")
    lines.append("")
    return lines


def _memory_section(sweeps: list[dict], args: argparse.Namespace) -> list[str]:
    """Section 5: peak RSS / PSS over the driver and its process tree, and the sweep commands."""
    default_nfe = 10 if any(s['nfe'] == 10 for s in sweeps) else sweeps[0]['nfe']
    budget = ' (with the budget flags above)' if args.quick or args.trials != DEFAULT_TRIALS else ''
    lines = [
        "Summed over the driver and every process under it (the local Ray's GCS, raylet, workers), sampled every "
        "0.25 s (PSS every 2 s). RSS counts shared pages (torch's libraries) once per process, so it overstates; PSS splits "
        f"them. NFE {default_nfe} is the default sweep{budget}.\n",
        "| NFE | peak RSS (all) | peak PSS (all) | driver RSS | processes |\n|---|---|---|---|---|",
    ]
    for s in sweeps:
        lines.append(f"| {s['nfe']} | {s['peak_rss'] / 2**30:.2f} GiB | {s['peak_pss'] / 2**30:.2f} GiB | "
                     f"{s['driver_rss'] / 2**30:.2f} GiB | {s['peak_procs']} |")
    lines += ["\nCommands:\n", "```"]
    lines += [s["cmd"].replace(str(Path(tempfile.gettempdir())), "$TMP") for s in sweeps]
    lines.append("```\n")
    return lines


# --------------------------------------------------------------------------------------------------


DEFAULT_TRIALS = 60


def main(argv: list[str] | None = None) -> int:
    from search.defaults import DEFAULT_MODEL, DEFAULTS

    global DEFAULT_TRIALS
    DEFAULT_TRIALS = DEFAULTS["trials"]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny budgets everywhere")
    ap.add_argument("--model", default=None, help=f"sweep model (default {DEFAULT_MODEL}; quick gmm:blobs64)")
    ap.add_argument("--nfe", default="5,10,20", help="sweep NFEs (default %(default)s)")
    ap.add_argument("--trials", type=int, default=None, help=f"trials per sweep (default {DEFAULTS['trials']}; quick 26)")
    ap.add_argument("--num-seeds", type=int, default=None, help="tuning seeds (default: the sweep's; quick 32)")
    ap.add_argument("--holdout-seeds", type=int, default=None, help="held-out seeds (default: the sweep's; quick 64)")
    ap.add_argument("--teacher-nfe", type=int, default=None, help="teacher steps (default: the sweep's; quick 100)")
    ap.add_argument("--parallel", type=int, default=None, help="trials per batch (default: the sweep's)")
    ap.add_argument("--actors", type=int, default=DEFAULTS["actors"], help="Ray actors per seed set (default %(default)s)")
    ap.add_argument("--sampler-model", default=None, help="bench_sampler model (default bundled:digits; quick tiny)")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: sampler, pool, sweeps")
    ap.add_argument("--out", default=str(OUT), help="report path (default docs/BENCHMARKS.md)")
    ap.add_argument("--json", default=None, help="also write the raw figures here")
    ap.add_argument("--from-json", default=None,
                    help="measure nothing: re-render the report from the raw figures an earlier run wrote with --json "
                         "(give the same budget flags as that run)")
    args = ap.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    shown = [a for i, a in enumerate(argv) if not (a.startswith(("--out", "--json")) or
                                                   (i > 0 and argv[i - 1] in ("--out", "--json")))]
    q = args.quick
    if args.trials is None:
        args.trials = 26 if q else DEFAULTS["trials"]
    if args.model is None:
        args.model = "gmm:blobs64" if q else DEFAULT_MODEL
    if q:
        args.num_seeds = args.num_seeds or 32
        args.holdout_seeds = args.holdout_seeds or 64
        args.teacher_nfe = args.teacher_nfe or 100
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    nfes = [int(v) for v in args.nfe.split(",") if v.strip()]

    if args.from_json:
        raw = json.loads(Path(args.from_json).read_text())
        from pipeline.io.files import atomic_write_text

        atomic_write_text(args.out, report(raw["machine"], args, [a for a in shown if not a.startswith("--from-json")
                                                                   and a != args.from_json],
                                           raw["sampler"], raw["pool"], raw["sweeps"]))
        print(f"wrote {args.out} from {args.from_json}")
        return 0
    m = machine()
    print(f"{m['date']}  {m['cpu']}, {m['cores']} cores, {fmt(m['ram_gib'], '.1f')} GiB, torch {m['torch']}, "
          f"load {' '.join(f'{v:.2f}' for v in m['load_avg'])}", flush=True)
    sampler = pool = None
    if "sampler" not in skip:
        import bench_sampler

        print("[1/3] sampler overhead, ours vs diffusers", flush=True)
        sargs = ["--model", args.sampler_model or ("tiny" if q else "bundled:digits")]
        sargs += ["--batch", "16", "--reps", "3"] if q else ["--batch", "256", "--reps", "5"]
        sampler = bench_sampler.main(sargs)
        sampler["reps"] = 3 if q else 5
    if "pool" not in skip:
        import bench_pool

        print("[2/3] Ray pool vs in-process", flush=True)
        pool = bench_pool.main(["--model", "tiny", "--seeds", "64", "--nfe", "5", "--reps", "1", "--teacher-nfe", "10"]
                               if q else [])
    sweeps: list[dict] = []
    if "sweeps" not in skip:
        print(f"[3/3] sweeps on {args.model}, NFE {nfes}, {args.trials} trials each", flush=True)
        with tempfile.TemporaryDirectory(prefix="stridelab-bench-") as tmp:
            for nfe in nfes:
                sweeps.append(run_sweep_subprocess(nfe, args, Path(tmp)))
    text = report(m, args, shown, sampler, pool, sweeps)
    from pipeline.io.files import atomic_write_text

    atomic_write_text(args.out, text)
    if args.json:
        atomic_write_text(args.json, json.dumps({"machine": m, "sampler": sampler, "pool": pool, "sweeps": sweeps},
                                                indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
