"""Sampler overhead and ours-vs-diffusers, as ratios measured in one run.

    python benchmarks/bench_sampler.py [--batch 256] [--nfe 10] [--reps 5] [--model bundled:digits]

1. overhead = ddim_sample wall time / the same NFE raw model calls alone (target <= 1.03).
2. ours / diffusers = ddim_sample / diffusers' DDIMScheduler loop on the same uniform schedule, same
   model, same x_T (target <= 1.0); the outputs are checked equal first.
Timings alternate between the contenders, rotating their order each rep, and report medians, so
background load and position effects hit all of them.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import datetime, timezone

import torch


def tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8,
    ).eval()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--nfe", type=int, default=10)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--model", default="tiny", help="'tiny' (random tiny UNet) or a model spec, e.g. bundled:digits")
    args = ap.parse_args(argv)

    from diffusers import DDIMScheduler

    from pipeline.solvers.ddim import ddim_sample
    from pipeline.models.denoisers import DiffusersDenoiser
    from pipeline.core.noise import make_alphas_cumprod
    from pipeline.core.schedules import uniform

    if args.model == "tiny":
        unet, ac = tiny_unet(), make_alphas_cumprod()
    else:
        from pipeline.models.load import load_model

        m = load_model(args.model)
        unet, ac = m.denoiser.model, m.alphas_cumprod
    den = DiffusersDenoiser(unet, ac)
    ts = uniform(args.nfe, ac).timesteps
    x_T = torch.randn(args.batch, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size,
                      generator=torch.Generator().manual_seed(0))
    t_batches = [torch.full((args.batch,), t, dtype=torch.long) for t in ts]
    sched = DDIMScheduler(num_train_timesteps=ac.numel(), beta_schedule="linear", clip_sample=False,
                          set_alpha_to_one=True, timestep_spacing="leading", steps_offset=0)
    sched.set_timesteps(args.nfe)

    @torch.no_grad()
    def raw():
        for tb in t_batches:
            unet(x_T, tb).sample

    def ours():
        return ddim_sample(den, x_T, ts, ac)

    @torch.no_grad()
    def theirs():
        x = x_T
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
        return x

    torch.testing.assert_close(ours(), theirs(), atol=1e-4, rtol=1e-4)  # same work, same answer
    times = {"raw": [], "ours": [], "diffusers": []}
    contenders = [("raw", raw), ("ours", ours), ("diffusers", theirs)]
    for rep in range(args.reps):
        # Rotate the order every rep: measured here, whichever runs first in a rep is ~5% slower
        # (allocator / cache state), which would otherwise bias the ratios.
        for name, fn in contenders[rep % 3:] + contenders[: rep % 3]:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    # The sampler's own arithmetic alone (NFE ddim_steps on the same tensors, no network): a figure
    # that background load cannot blur, unlike the small difference of two wall times above.
    from pipeline.solvers.ddim import ddim_step

    eps = torch.randn_like(x_T)
    math_times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        x = x_T
        for i, t in enumerate(ts):
            x, _ = ddim_step(x, eps, ac[t].item(), ac[ts[i + 1]].item() if i + 1 < len(ts) else 1.0)
        math_times.append(time.perf_counter() - t0)
    med["math"] = statistics.median(math_times)
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "batch": args.batch, "nfe": args.nfe, "model": args.model,
        "overhead": med["ours"] / med["raw"],
        "ours_over_diffusers": med["ours"] / med["diffusers"],
        "raw_s": med["raw"],
        "math_fraction": med["math"] / med["raw"],
    }
    print(f"machine: {result['machine']}, torch {torch.__version__}, {result['date']}")
    print(f"model {args.model}, batch {args.batch}, NFE {args.nfe}, {args.reps} reps (medians)")
    print(f"  raw model calls        {med['raw']:.4f} s")
    print(f"  ddim_sample            {med['ours']:.4f} s   overhead ratio {result['overhead']:.3f}  (target <= 1.03)")
    print(f"  diffusers DDIM loop    {med['diffusers']:.4f} s   ours/diffusers {result['ours_over_diffusers']:.3f}  (target <= 1.0)")
    print(f"  DDIM arithmetic alone  {med['math']:.5f} s   = {100 * result['math_fraction']:.3f}% of the model time")
    return result


if __name__ == "__main__":
    main()
