"""`stridelab sample` at scale: is the driver's memory flat in the number of samples?

    python benchmarks/bench_sample_scale.py                      # 10^3, 10^4, 10^5 samples (bundled:digits, NFE 10)
    python benchmarks/bench_sample_scale.py --sizes 1000,10000   # a subset
    python benchmarks/bench_sample_scale.py --quick              # 200 and 2000 samples: same code paths
    python benchmarks/bench_sample_scale.py --from-json F        # re-render the section from saved figures

One real ``stridelab sample`` subprocess per size (a local Ray, ``--actors`` Ray Data actors, Parquet into a
temporary directory). The driver's peak resident memory is the kernel's own figure for that process
(``getrusage(RUSAGE_SELF).ru_maxrss``, read in the driver at exit: the wrapper below runs ``jobs.cli`` as
``__main__`` and writes it to a file); Ray's own processes (GCS, raylet, the actors) are not the driver and
are not counted. Samples/s is samples / wall time of the whole command (start-up included); the marginal
rate between the two largest sizes leaves the start-up out.

The driver streams: each batch that comes back is written as one Parquet row group and dropped
(`pipeline.distributed.data.write_sample_dir`), so its peak RSS should not grow with the number of samples:
the ratio RSS(largest) / RSS(smallest) is printed (target <= 1.2).

The section is written into docs/BENCHMARKS.md between ``<!-- sample-scale -->`` markers (atomically), the
raw figures to docs/bench_sample_scale.json.
"""

from __future__ import annotations

import argparse
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
RAW = ROOT / "docs" / "bench_sample_scale.json"
BEGIN, END = "<!-- sample-scale -->", "<!-- /sample-scale -->"
TARGET = 1.2

# Runs jobs.cli as __main__ and, at exit, writes this process's peak RSS (KiB on Linux) to $PEAK_RSS_FILE.
WRAPPER = ("import atexit, os, resource, runpy; "
           "atexit.register(lambda: open(os.environ['PEAK_RSS_FILE'], 'w').write("
           "str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))); "
           "runpy.run_module('jobs.cli', run_name='__main__', alter_sys=True)")


def run_one(n: int, model: str, nfe: int, actors: int, batch_size: int, work: Path) -> dict[str, Any]:
    """One `stridelab sample` of `n` samples: wall time, the driver's peak RSS, the dataset's size."""
    out, peak = work / f"s{n}", work / f"peak{n}"
    args = ["sample", "--model", model, "--schedule", "uniform", "--nfe", str(nfe), "--num-seeds", str(n),
            "--out-dir", str(out), "--actors", str(actors), "--batch-size", str(batch_size), "--no-progress"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT), "PEAK_RSS_FILE": str(peak)}
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", WRAPPER, *args], env=env, capture_output=True, text=True, cwd=work)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"stridelab sample --num-seeds {n} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(out / "samples.parquet").metadata
    if meta.num_rows != n:
        raise SystemExit(f"{n} samples asked, {meta.num_rows} written")
    fig = {"samples": n, "wall_s": wall, "samples_per_s": n / wall, "driver_peak_rss_mib": int(peak.read_text()) / 1024,
           "row_groups": meta.num_row_groups, "parquet_mib": (out / "samples.parquet").stat().st_size / 2**20,
           "cmd": "stridelab " + " ".join(a if a != str(out) else "OUT" for a in args)}
    for p in out.iterdir():  # 10^5 samples are ~100 MB: keep the disk free for the next size
        p.unlink()
    out.rmdir()
    return fig


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    lo, hi = min(runs, key=lambda r: r["samples"]), max(runs, key=lambda r: r["samples"])
    s = {"rss_ratio": hi["driver_peak_rss_mib"] / lo["driver_peak_rss_mib"], "smallest": lo["samples"],
         "largest": hi["samples"], "target": TARGET}
    if len(runs) >= 2:
        a, b = sorted(runs, key=lambda r: r["samples"])[-2:]
        s["marginal_samples_per_s"] = (b["samples"] - a["samples"]) / max(b["wall_s"] - a["wall_s"], 1e-9)
    return s


def section(meta: dict[str, Any], runs: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    ok = "met" if summary["rss_ratio"] <= TARGET else "**not met**"
    cmd = " ".join(["python benchmarks/bench_sample_scale.py", meta["argv"]]).strip()
    lines = [BEGIN, "## Sampling at scale: `stridelab sample` to Parquet (issue 15)", "",
             f"Measured {meta['date']} on {meta['machine']}, load average {meta['load']} at the start (the cores "
             f"were shared with other work: wall times are upper bounds); `{cmd}`. Model {meta['model']}, "
             f"NFE {meta['nfe']} (uniform DDIM), {meta['actors']} Ray Data "
             f"actors, batches of {meta['batch_size']}. Peak RSS is the driver process's own (`ru_maxrss` at exit), "
             "not Ray's processes.", "",
             "| samples | wall (s) | samples/s | driver peak RSS (MiB) | Parquet row groups | Parquet (MiB) |",
             "|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: r["samples"]):
        lines.append(f"| {r['samples']:,} | {r['wall_s']:.1f} | {r['samples_per_s']:.0f} | "
                     f"{r['driver_peak_rss_mib']:.0f} | {r['row_groups']} | {r['parquet_mib']:.1f} |")
    lines += ["", f"Driver peak RSS at {summary['largest']:,} / at {summary['smallest']:,} samples: "
                  f"**{summary['rss_ratio']:.3f}** (target <= {TARGET}: {ok})."]
    if "marginal_samples_per_s" in summary:
        lines.append(f"Marginal throughput between the two largest sizes (start-up excluded): "
                     f"{summary['marginal_samples_per_s']:.0f} samples/s.")
    for note in meta.get("notes", []):
        lines += ["", note]
    lines.append(END)
    return "\n".join(lines)


def write_section(text: str) -> None:
    from pipeline.io.reports import replace_section

    replace_section(OUT, text, BEGIN, END)


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{platform.machine()}, {cpu}, {os.cpu_count()} CPUs"


def shown_argv(argv: list[str]) -> str:
    """The command line as the report shows it: without ``--note`` (its text is printed under the table)."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--note":
            skip = True
        elif not a.startswith("--note="):
            kept.append(a)
    return " ".join(kept)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,10000,100000", help="comma-separated sample counts")
    p.add_argument("--quick", action="store_true", help="sizes 200,2000 (smoke run)")
    p.add_argument("--model", default="bundled:digits")
    p.add_argument("--nfe", type=int, default=10)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--note", action="append", default=[], help="a line to add under the table (repeatable)")
    p.add_argument("--from-json", default=None, help="re-render docs/BENCHMARKS.md's section from saved figures")
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/ as it is")
    args = p.parse_args(argv)
    if args.from_json:
        raw = json.loads(Path(args.from_json).read_text())
        write_section(section(raw["meta"], raw["runs"], raw["summary"]))
        return 0
    sizes = [200, 2000] if args.quick else [int(s) for s in args.sizes.split(",")]
    meta = {"date": dt.date.today().isoformat(), "machine": machine(), "model": args.model, "nfe": args.nfe,
            "actors": args.actors, "batch_size": args.batch_size, "load": f"{os.getloadavg()[0]:.1f}",
            "argv": shown_argv(argv if argv is not None else sys.argv[1:]), "notes": args.note}
    runs = []
    with tempfile.TemporaryDirectory(prefix="stridelab-sample-scale-") as tmp:
        for n in sizes:
            r = run_one(n, args.model, args.nfe, args.actors, args.batch_size, Path(tmp))
            runs.append(r)
            print(f"{n:>7} samples: {r['wall_s']:7.1f} s  {r['samples_per_s']:7.0f} samples/s  driver peak RSS "
                  f"{r['driver_peak_rss_mib']:6.0f} MiB  {r['row_groups']} row groups  {r['parquet_mib']:.1f} MiB",
                  flush=True)
    summary = summarize(runs)
    print(f"driver peak RSS ratio {summary['largest']} / {summary['smallest']} samples: {summary['rss_ratio']:.3f} "
          f"(target <= {TARGET})")
    if not args.no_write:
        from pipeline.io.files import atomic_write_json

        atomic_write_json(RAW, {"meta": meta, "summary": summary, "runs": runs})
        write_section(section(meta, runs, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
