"""`stridelab report digits`: sample the bundled digits DDPM, save a grid, measure FID/KID with the digits
feature net.

``stridelab report digits [--num 1797] [--steps 200] [--grid docs/digits_samples.png]
[--json docs/bundled_model_metrics.json]``: the figures in docs/BUNDLED_MODEL.md come from here.
Sample i starts from seed i (per-sample noise), so the grid is the first 64 of the FID samples.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def uniform_timesteps(steps: int, T: int = 1000) -> list[int]:
    """``steps`` evenly strided timesteps ending at 0, e.g. 200 -> [995, 990, ..., 0]."""
    stride = T // steps
    return list(range(stride * (steps - 1), -1, -stride))


def sample_digits(num: int, steps: int, batch_size: int = 256):
    """``num`` samples in [-1, 1] (seeds 0..num-1) from the bundled DDPM with eta=0 DDIM."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel
    from tqdm.auto import tqdm

    from pipeline.models.bundled import DIGITS_DDPM_DIR
    from pipeline.solvers.ddim import ddim_sample
    from pipeline.models.denoisers import DiffusersDenoiser
    from pipeline.core.seeds import initial_noise

    unet = UNet2DModel.from_pretrained(DIGITS_DDPM_DIR, subfolder="unet", use_safetensors=True).eval()
    abar = DDPMScheduler.from_pretrained(DIGITS_DDPM_DIR, subfolder="scheduler").alphas_cumprod
    denoiser = DiffusersDenoiser(unet, abar)
    ts = uniform_timesteps(steps)
    out = []
    for start in tqdm(range(0, num, batch_size), desc=f"DDIM {steps} steps"):
        seeds = range(start, min(num, start + batch_size))
        x_T, _ = initial_noise(seeds, (1, 8, 8))
        out.append(ddim_sample(denoiser, x_T, ts, abar))
    return torch.cat(out)


def grid_png(images01, nrow: int = 8, scale: int = 6, pad: int = 1) -> bytes:
    """An ``nrow`` x ``nrow`` PNG grid of [B, 1, 8, 8] images in [0, 1], ink black on white, grey gaps."""
    from pipeline.io.images import png_bytes, tile

    return png_bytes(tile(images01[: nrow * nrow], cols=nrow, scale=scale, pad=pad * scale, pad_value=0.75, ink_black=True))


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``report`` with its ``digits`` sub-command."""
    report = sub.add_parser("report", help="reports on the bundled models (figures of docs/BUNDLED_MODEL.md)",
                            description="Reports on the small models bundled under pipeline/assets/digits/.")
    targets = report.add_subparsers(dest="report_target", metavar="{digits}", required=True)
    p = targets.add_parser("digits", help="sample grid and FID/KID of the bundled digits DDPM",
                           description=__doc__.splitlines()[0].strip("`"))
    p.add_argument("--num", type=int, default=1797, help="samples, seeds 0..NUM-1 (default %(default)s)")
    p.add_argument("--steps", type=int, default=200, help="uniform DDIM steps (default %(default)s)")
    p.add_argument("--grid", default="docs/digits_samples.png", help="output PNG file (default %(default)s)")
    p.add_argument("--json", default="docs/bundled_model_metrics.json", help="output JSON file (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads; 1 is fastest on a busy 2-core machine "
                                                          "(default %(default)s)")
    p.add_argument("--samples", default="results/digits_samples_200.pt",
                   help="cache file of the generated samples: reused if present, else written (default %(default)s)")
    p.set_defaults(func=run_digits)


def load_or_sample(cache: Path, num: int, steps: int):
    """The samples and their wall time: from `cache` when it holds `num` samples at `steps`, else drawn now."""
    import torch

    from pipeline.errors import StridelabError

    if cache.is_file():
        saved = torch.load(cache, weights_only=True)
        x0, sample_s = saved["x0"], float(saved["wall_s"])
        if x0.shape[0] != num or int(saved["steps"]) != steps:
            raise StridelabError(f"{cache} holds {x0.shape[0]} samples at {int(saved['steps'])} steps; delete it or "
                                 "change `num`/`steps`")
        return x0, sample_s
    t0 = time.monotonic()
    x0 = sample_digits(num, steps)
    sample_s = time.monotonic() - t0
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"x0": x0, "steps": steps, "wall_s": sample_s}, cache)
    return x0, sample_s


def run_digits(args: argparse.Namespace) -> int:
    import torch

    from pipeline.models.digits import load_digits_images, to_unit
    from pipeline.metrics.features import extract_features, fid_from_features, kid_from_features, load_feature_net
    from pipeline.io.files import atomic_write_bytes, atomic_write_json

    torch.set_num_threads(args.threads)
    x0, sample_s = load_or_sample(Path(args.samples), args.num, args.steps)

    net = load_feature_net()
    real = {s: extract_features(to_unit(load_digits_images(s)), net) for s in ("all", "train", "test")}
    perm = torch.randperm(real["all"].shape[0], generator=torch.Generator().manual_seed(0)).numpy()
    half_a, half_b = real["all"][perm[: len(perm) // 2]], real["all"][perm[len(perm) // 2 :]]
    u = to_unit(x0)
    atomic_write_bytes(args.grid, grid_png(u))
    fake = extract_features(u, net)
    fake_half = fake[: len(fake) // 2]

    def both(f1, f2):
        return {"fid": round(fid_from_features(f1, f2), 4), "kid": round(kid_from_features(f1, f2), 6),
                "n": [int(len(f1)), int(len(f2))]}

    metrics = {
        "feature_net": "pipeline/assets/digits/features (pre-activation fc features / RMS on train, D=128)",
        "real_train_vs_test": both(real["train"], real["test"]),
        "real_half_vs_half": both(half_a, half_b),
        f"model_{args.steps}_steps_vs_all": both(fake, real["all"]),
        f"model_{args.steps}_steps_half_vs_half_real": both(fake_half, half_b),
        "samples": int(args.num),
        "ddim_steps": args.steps,
        "eta": 0.0,
        "seeds": f"0..{args.num - 1}",
        "out_of_range_fraction": round(float(((x0 < -1) | (x0 > 1)).float().mean()), 5),
        "sampling_wall_s": round(sample_s, 1),
        "torch_version": torch.__version__,
    }
    atomic_write_json(args.json, metrics)
    json.dump(metrics, sys.stdout, indent=2)
    print()
    return 0

