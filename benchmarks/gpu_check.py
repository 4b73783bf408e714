"""GPU readiness check: one prepared script, at most about 5 minutes, that writes docs/GPU.md.

Without CUDA it prints one line and exits 0 (nothing measured, docs/GPU.md untouched). With CUDA it checks

1. CUDA samples vs CPU float32 samples (bundled:digits, uniform DDIM NFE 10), per dtype, within `TOLERANCE`;
2. bit-identity of CUDA samples across batch sizes (in one worker) and actor counts (Ray Data, 1 and 2
   actors sharing the GPUs), with deterministic settings (``CUBLAS_WORKSPACE_CONFIG``, deterministic
   algorithms, no cuDNN benchmarking);
3. images/s of `ddim_sample` (through the `DiffusersDenoiser` adapter) vs the raw UNet's NFE forward calls
   at the raw UNet's best batch size, per dtype, for the bundled model and a CIFAR-10-size UNet
   (google/ddpm-cifar10-32's UNet2DModel config, random weights; about 35.7 M parameters); target ratio >= 0.95;
4. samples/s of the Ray Data actor pool with one GPU per actor.

Exit status: 0 when every check passes, 1 when one fails (the table is written either way).
The measurement functions take ``device`` so the tests run them on the CPU at tiny sizes.

    python benchmarks/gpu_check.py [--out docs/GPU.md] [--budget-s 280]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "bfloat16", "float16")
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.25, "float16": 0.05}
"""Max |CUDA - CPU float32| of samples in [-1, 1] (bundled:digits, NFE 10). float32 differs only by kernel
rounding; the half-precision bounds are those of tests/test_dtype.py (CPU bf16/fp16 vs fp32)."""
TARGET_RATIO = 0.95

CIFAR10_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "freq_shift": 1,
    "flip_sin_to_cos": False,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (128, 256, 256, 256),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 0,
    "act_fn": "silu",
    "attention_head_dim": None,
    "norm_num_groups": 32,
    "norm_eps": 1e-6,
}
"""google/ddpm-cifar10-32's UNet2DModel configuration, written out (there is no Hub here)."""
CIFAR10_PARAMS = 35.7e6


def no_cuda_line() -> str:
    return (f"gpu-check: no CUDA device here (torch {torch.__version__}, cuda available "
            f"{torch.cuda.is_available()}); nothing measured")


def cifar10_unet(seed: int = 0) -> torch.nn.Module:
    """A CIFAR-10-size UNet2DModel with random weights (seeded)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(**CIFAR10_UNET_CONFIG).eval().requires_grad_(False)


def num_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_of(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    """Seconds of the fastest of `reps` calls, after one warm-up call."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def unet_vs_ddim(unet: torch.nn.Module, alphas_cumprod: torch.Tensor, sample_shape: Sequence[int], device: str,
                 dtype: str, batch: int, nfe: int, reps: int = 3) -> dict[str, float]:
    """images/s of the raw UNet (NFE forward calls on a batch in `dtype`) and of `ddim_sample` through the
    adapter (float32 state, the network in `dtype`) on the same batch; ``ratio`` = ddim / raw."""
    from pipeline.core.schedules import make_schedule
    from pipeline.models.denoisers import DiffusersDenoiser
    from pipeline.solvers.ddim import ddim_sample

    dev = torch.device(device)
    net = unet.to(device=dev, dtype=getattr(torch, dtype))
    ts = make_schedule("uniform", nfe, alphas_cumprod).timesteps
    x32 = torch.randn(batch, *sample_shape, generator=torch.Generator().manual_seed(0)).to(dev)
    x = x32.to(net.dtype)
    t_batches = [torch.full((batch,), int(t), dtype=torch.long, device=dev) for t in ts]
    den = DiffusersDenoiser(net, alphas_cumprod)

    def raw() -> None:
        with torch.no_grad():
            for t in t_batches:
                net(x, t)

    raw_s = _best_of(raw, dev, reps)
    ddim_s = _best_of(lambda: ddim_sample(den, x32, ts, alphas_cumprod), dev, reps)
    return {"raw_ips": batch / raw_s, "ddim_ips": batch / ddim_s, "ratio": raw_s / ddim_s}


def best_batch(unet: torch.nn.Module, alphas_cumprod: torch.Tensor, sample_shape: Sequence[int], device: str,
               dtype: str, batches: Sequence[int], nfe: int, deadline: float) -> tuple[int, dict[str, float]]:
    """The batch size of `batches` with the highest raw-UNet images/s (stops growing past the deadline or
    when throughput falls), and `unet_vs_ddim` there."""
    best: tuple[int, dict[str, float]] | None = None
    for b in batches:
        if best is not None and time.monotonic() > deadline:
            break
        m = unet_vs_ddim(unet, alphas_cumprod, sample_shape, device, dtype, b, nfe)
        if best is not None and m["raw_ips"] <= best[1]["raw_ips"]:
            break
        best = (b, m)
    assert best is not None
    return best


def device_vs_cpu(spec: str, device: str, dtype: str, seeds: Sequence[int], nfe: int) -> float:
    """max |samples on `device` in `dtype` - CPU float32 samples| (`SamplerWorker`, uniform DDIM)."""
    from pipeline.core.schedules import make_schedule
    from pipeline.distributed import SamplerWorker

    ref = SamplerWorker(spec, device="cpu", dtype="float32")
    ts = make_schedule("uniform", nfe, ref.model.alphas_cumprod).timesteps
    x = SamplerWorker(spec, device=device, dtype=dtype).sample(list(seeds), ts)
    return (x - ref.sample(list(seeds), ts)).abs().max().item()


def identical_across_batches(spec: str, device: str, dtype: str, seeds: Sequence[int], nfe: int,
                             chunks: Sequence[int]) -> bool:
    """Whether one worker's samples of `seeds` are bit-identical when asked for in chunks of each size."""
    from pipeline.core.schedules import make_schedule
    from pipeline.distributed import SamplerWorker

    w = SamplerWorker(spec, device=device, dtype=dtype)
    ts = make_schedule("uniform", nfe, w.model.alphas_cumprod).timesteps
    seeds = list(seeds)
    whole = w.sample(seeds, ts)
    for c in chunks:
        parts = torch.cat([w.sample(seeds[i:i + c], ts) for i in range(0, len(seeds), c)])
        if not torch.equal(parts, whole):
            return False
    return True


def pool_samples(spec: str, nfe: int, n: int, actors: int, dtype: str, num_gpus: float | None,
                 batch_size: int = 256) -> tuple[torch.Tensor, float]:
    """All `n` samples from Ray Data's actor pool (`generate_samples`) and samples/s (start-up included)."""
    import numpy as np

    from pipeline.core.schedules import make_schedule
    from pipeline.distributed import generate_samples
    from pipeline.models.load import load_model

    ts = make_schedule("uniform", nfe, load_model(spec).alphas_cumprod).timesteps
    t0 = time.perf_counter()
    rows = [b["sample"] for b in generate_samples(spec, ts, n, actors=actors, batch_size=batch_size,
                                                  num_gpus=num_gpus, dtype=dtype)]
    secs = time.perf_counter() - t0
    return torch.from_numpy(np.concatenate(rows)), n / secs


def render_gpu_md(meta: dict[str, str], rows: Sequence[dict[str, Any]]) -> str:
    """docs/GPU.md from the machine description `meta` and the check rows
    (``{"check", "model", "dtype", "batch", "value", "target", "ok"}``; ``ok`` None = a figure, no target)."""
    lines = ["# GPU check", "",
             "Written by `make gpu-check` (benchmarks/gpu_check.py); do not edit by hand.", "",
             *[f"- {k}: {v}" for k, v in meta.items()], "",
             "| check | model | dtype | batch | value | target | ok |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = "-" if r.get("ok") is None else ("yes" if r["ok"] else "**no**")
        lines.append(f"| {r['check']} | {r.get('model', '-')} | {r.get('dtype', '-')} | {r.get('batch', '-')} | "
                     f"{r['value']} | {r.get('target', '-')} | {ok} |")
    fails = [r["check"] for r in rows if r.get("ok") is False]
    lines += ["", f"Result: {'all checks pass' if not fails else 'FAILED: ' + ', '.join(fails)}.", ""]
    return "\n".join(lines)


def _deterministic() -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS call; actors inherit it
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def run_checks(budget_s: float) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """Every CUDA check, each skipped (and said so) once `budget_s` is spent."""
    from pipeline.core.noise import make_alphas_cumprod
    from pipeline.models.load import load_model

    _deterministic()
    deadline = time.monotonic() + budget_s
    gpus = torch.cuda.device_count()
    meta = {"machine": f"{torch.cuda.get_device_name(0)} x {gpus}, {platform.node()}",
            "torch": torch.__version__, "CUDA": str(torch.version.cuda),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    rows: list[dict[str, Any]] = []
    spec, nfe = "bundled:digits", 10

    def left(name: str) -> bool:
        if time.monotonic() < deadline:
            return True
        rows.append({"check": name, "value": "skipped (time budget spent)", "ok": None})
        return False

    for dt in DTYPES:
        if left(f"cuda vs cpu ({dt})"):
            d = device_vs_cpu(spec, "cuda", dt, range(256), nfe)
            rows.append({"check": "cuda vs cpu fp32, max abs", "model": spec, "dtype": dt, "batch": 256,
                         "value": f"{d:.2e}", "target": f"< {TOLERANCE[dt]:g}", "ok": d < TOLERANCE[dt]})
    if left("bit-identity across batch sizes"):
        ok = identical_across_batches(spec, "cuda", "float32", range(192), nfe, (1, 7, 64, 100))
        rows.append({"check": "bit-identical across batch sizes 1, 7, 64, 100, 192", "model": spec,
                     "dtype": "float32", "value": str(ok), "target": "True", "ok": ok})
    if left("bit-identity across actor counts"):
        a1, ips1 = pool_samples(spec, nfe, 2048, 1, "float32", min(1.0, float(gpus)))
        a2, ips2 = pool_samples(spec, nfe, 2048, 2, "float32", min(1.0, gpus / 2))
        ok = torch.equal(a1, a2)
        rows.append({"check": "bit-identical, 1 vs 2 actors", "model": spec, "dtype": "float32",
                     "value": str(ok), "target": "True", "ok": ok})
        rows.append({"check": f"actor pool samples/s (1 actor, {min(1.0, float(gpus)):g} GPU)", "model": spec,
                     "dtype": "float32", "batch": 256, "value": f"{ips1:.0f}", "ok": None})
        rows.append({"check": f"actor pool samples/s (2 actors, {min(1.0, gpus / 2):g} GPU each)", "model": spec,
                     "dtype": "float32", "batch": 256, "value": f"{ips2:.0f}", "ok": None})
    digits = load_model(spec)
    cifar = cifar10_unet()
    n = num_params(cifar)
    rows.append({"check": "CIFAR-10 UNet parameters", "model": "cifar10-size UNet2DModel", "value": f"{n / 1e6:.2f} M",
                 "target": "35.7 M +- 0.1", "ok": abs(n - CIFAR10_PARAMS) < 0.1e6})
    nets = [(spec, digits.denoiser.model, digits.alphas_cumprod, digits.sample_shape, (256, 1024, 4096, 16384)),
            ("cifar10-size UNet2DModel", cifar, make_alphas_cumprod(), (3, 32, 32), (32, 64, 128, 256, 512))]
    for name, net, abar, shape, batches in nets:
        for dt in DTYPES:
            if left(f"ddim vs raw unet ({name}, {dt})"):
                b, m = best_batch(net, abar, shape, "cuda", dt, batches, nfe, deadline)
                rows.append({"check": "images/s: ddim_sample / raw UNet", "model": name, "dtype": dt, "batch": b,
                             "value": f"{m['ddim_ips']:.0f} / {m['raw_ips']:.0f} = {m['ratio']:.3f}",
                             "target": f">= {TARGET_RATIO}", "ok": m["ratio"] >= TARGET_RATIO})
    return meta, rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "GPU.md"))
    ap.add_argument("--budget-s", type=float, default=280.0, help="seconds of checks; later ones are skipped")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(no_cuda_line())
        return 0
    from pipeline.io.files import atomic_write_text

    meta, rows = run_checks(args.budget_s)
    text = render_gpu_md(meta, rows)
    atomic_write_text(args.out, text)
    print(text)
    return 1 if any(r.get("ok") is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
