"""Throughput of the Ray actor pool vs the same work in this process, on the same cores.

The work is `SamplerPool.evaluate` (recon vs a cached teacher) of a few schedules on one seed set,
after a warm-up call (teacher built, actors started). The in-process run is the same worker code
(``actors=0``) using every core through torch's intra-op threads; the pool runs one actor per core, one
thread each. Prints throughput in network-evaluated samples per second and the ratio pool / in-process
(target >= 0.9), with the machine, its load and the date.

Model: ``bundled:digits`` when it is built, else a tiny random UNet2DModel (8x8, widths 32/64).

    python benchmarks/bench_pool.py [--seeds 256] [--nfe 10] [--reps 3] [--actors N] [--model tiny|SPEC]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _model_spec(tmp: str, want: str | None = None) -> str:
    from pipeline.errors import StridelabError
    from pipeline.models.load import load_model

    if want not in (None, "tiny"):
        return want
    try:
        if want == "tiny":
            raise FileNotFoundError
        load_model("bundled:digits")
        return "bundled:digits"
    except (StridelabError, FileNotFoundError):
        import torch
        from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

        torch.manual_seed(0)
        unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64),
                           layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
        d = Path(tmp) / "tiny-ddpm"
        DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(d, safe_serialization=True)
        return str(d)


def _time(pool, schedules, reps: int) -> list[float]:
    pool.evaluate(schedules)  # warm-up: teacher cached, actors started, caches hot
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        pool.evaluate(schedules)
        out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark (argv as on the command line); returns the figures it printed."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=256)
    ap.add_argument("--nfe", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--actors", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--teacher-nfe", type=int, default=20)
    ap.add_argument("--model", default=None, help="model spec, or 'tiny' (default: bundled:digits when built, else tiny)")
    args = ap.parse_args(argv)

    import ray
    import torch

    from pipeline.distributed import SamplerPool, init_ray
    from pipeline.models.load import load_model
    from pipeline.core.schedules import make_schedule

    cores = os.cpu_count() or 1
    print(f"date     {datetime.now(timezone.utc).isoformat(timespec='seconds')}")
    print(f"machine  {platform.node()} {platform.machine()}, {_cpu_name()}, {cores} cores, "
          f"load avg {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"software python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        spec = _model_spec(tmp, args.model)
        abar = load_model(spec).alphas_cumprod
        schedules = [make_schedule(n, args.nfe, abar) for n in ("uniform", "karras", "logsnr", "quadratic")]
        work = args.seeds * args.nfe * len(schedules)  # network-evaluated samples per evaluate()
        seeds = range(args.seeds)
        print(f"model    {spec}; {len(schedules)} schedules x nfe {args.nfe} x {args.seeds} seeds per evaluate(), "
              f"median of {args.reps}")

        torch.set_num_threads(cores)
        local = SamplerPool(spec, seeds, args.teacher_nfe, actors=0)
        t_local = statistics.median(_time(local, schedules, args.reps))
        print(f"in-process ({torch.get_num_threads()} threads): {t_local:.3f} s  {work / t_local:9.0f} samples/s")

        init_ray("local", num_cpus=cores)  # a fresh local Ray on every core, whatever $RAY_ADDRESS says
        with SamplerPool(spec, seeds, args.teacher_nfe, actors=args.actors) as pool:
            t_pool = statistics.median(_time(pool, schedules, args.reps))
        print(f"ray pool ({args.actors} actors):     {t_pool:.3f} s  {work / t_pool:9.0f} samples/s")
        ray.shutdown()
    ratio = t_local / t_pool
    print(f"ratio pool / in-process throughput: {ratio:.2f} (target >= 0.9)")
    return {"model": spec, "seeds": args.seeds, "nfe": args.nfe, "schedules": len(schedules), "reps": args.reps,
            "actors": args.actors, "threads_in_process": cores, "in_process_s": t_local, "pool_s": t_pool,
            "in_process_samples_per_s": work / t_local, "pool_samples_per_s": work / t_pool, "ratio": ratio}


if __name__ == "__main__":
    main()
