"""`stridelab interpolate`: a spherical morph between seeds (or inverted images), decoded with a schedule."""

from __future__ import annotations

import argparse

from jobs.common import add_model_arg, add_solver_arg, add_tracking_args, check_out_dir, int_list

EXPERIMENT = "stridelab-interpolate"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "interpolate",
        help="slerp between noise vectors (seeds or inverted images) and decode the morph",
        description=(
            "Interpolate spherically between two or more noise vectors, the x_T of --seeds or the codes in a "
            "--noise file from `stridelab invert`, with --frames frames per segment (ends included), and decode "
            "every frame with a solver on a schedule. Writes DIR/strip.png (the frames in order) and "
            "DIR/smoothness.json: mean and max distance between consecutive frames in feature space, the "
            "key frames' distance (chord), path length / chord and max step / even step (lower is smoother; "
            "compare schedules on the same seeds). Printed, and logged to MLflow unless --no-mlflow."
        ),
    )
    add_model_arg(p)
    keys = p.add_mutually_exclusive_group(required=True)
    keys.add_argument("--seeds", type=int_list, help="comma-separated seeds, at least two: their x_T are the keys")
    keys.add_argument("--noise", help="a noise file from `stridelab invert` (.safetensors or .parquet): its codes are the keys")
    p.add_argument("--pick", type=int_list, default=None,
                   help="with --noise: comma-separated row indices to use as keys, in order (default all)")
    p.add_argument("--frames", type=int, default=8, help="frames per segment, both ends included (default %(default)s)")
    p.add_argument("--schedule", required=True, help="decoder: a schedule name (needs --nfe) or a .json file")
    p.add_argument("--nfe", type=int, default=None, help="model evaluations of a named --schedule")
    add_solver_arg(p, "decodes every frame")
    p.add_argument("--features", default="auto",
                   help="feature space of the smoothness figures: digits[:DIR], pixels, or auto (as evaluate's "
                        "--fid-features: digits for 1x8x8 models)")
    p.add_argument("--out-dir", required=True, help="output directory DIR (replaced atomically if it exists)")
    add_tracking_args(p, EXPERIMENT)
    p.set_defaults(param_flags={"frames": "--frames", "keys": "--seeds/--noise"})
    p.set_defaults(func=run)


def _keys(args: argparse.Namespace, model, first_timestep: int):
    """(key noises [M, *sample_shape], their labels) from --seeds or --noise/--pick."""
    from pipeline.core.seeds import initial_noise
    from pipeline.errors import StridelabError
    from pipeline.io.noise_files import read_noise

    if args.seeds is not None:
        if args.pick is not None:
            raise StridelabError("--pick goes with --noise, not --seeds")
        if any(s < 0 for s in args.seeds):
            raise StridelabError(f"--seeds must be >= 0, got {args.seeds}")
        return initial_noise(args.seeds, model.sample_shape)[0], [f"seed {s}" for s in args.seeds]
    noise, names, desc = read_noise(args.noise)
    if desc.get("model") != args.model:
        raise StridelabError(f"--noise {args.noise} was inverted with model {desc.get('model')}, not --model {args.model}")
    if desc.get("timestep") != first_timestep:
        raise StridelabError(f"--noise {args.noise} holds codes at timestep {desc.get('timestep')} but --schedule starts "
                             f"at {first_timestep}: decode with the schedule it was inverted with (its schedule.json)")
    pick = args.pick if args.pick is not None else list(range(len(names)))
    bad = [i for i in pick if not 0 <= i < len(names)]
    if bad:
        raise StridelabError(f"--pick {bad[0]} is out of range: --noise {args.noise} holds {len(names)} codes (0..{len(names) - 1})")
    return noise[pick], [names[i] for i in pick]


def _track(args: argparse.Namespace, figures: dict, strip, labels) -> str | None:
    if not args.track:
        return None
    from search.tracking import Tracker

    tracker = Tracker(args.tracking_uri, args.experiment or EXPERIMENT)
    run_id = tracker.start("interpolate", {"model": args.model, "keys": ", ".join(labels), "frames": args.frames,
                                           "schedule": args.schedule, "nfe": args.nfe, "solver": args.solver,
                                           "features": args.features})
    tracker.log_metrics(figures)
    tracker.log_artifact(strip)
    tracker.end()
    return run_id


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from pipeline.core.interpolation import slerp_path
    from pipeline.core.schedules import check_nfe, resolve_schedule
    from pipeline.io.files import atomic_directory, atomic_write_bytes, atomic_write_text
    from pipeline.io.images import png_bytes, tile
    from pipeline.metrics.fid import make_feature_fn
    from pipeline.metrics.reference import auto_features
    from pipeline.metrics.smoothness import path_smoothness
    from pipeline.models.load import load_model
    from pipeline.solvers.registry import get_solver, solve

    out = Path(args.out_dir)
    check_out_dir(args.out_dir)
    solver = get_solver(args.solver)
    model = load_model(args.model)
    steps = None
    if args.nfe is not None:
        check_nfe(args.nfe, model.num_train_timesteps)
        steps = solver.steps_for_budget(args.nfe)
    sched = resolve_schedule(args.schedule, steps, model.alphas_cumprod)
    features = make_feature_fn(auto_features(model) if args.features == "auto" else args.features)
    keys, labels = _keys(args, model, sched.timesteps[0])
    path = slerp_path(keys, args.frames)

    x0 = solve(solver.name, model.denoiser, path, sched.timesteps, model.alphas_cumprod)
    x01 = model.to_unit(x0)
    figures = path_smoothness(features(x01.clamp(0, 1)), args.frames)
    with atomic_directory(out) as tmp:
        # One row per segment, its two keys at the ends (a shared key shows at the end of one row and the start of the next).
        rows = [j * (args.frames - 1) + i for j in range(len(keys) - 1) for i in range(args.frames)]
        atomic_write_bytes(tmp / "strip.png", png_bytes(tile(x01[rows], cols=args.frames, scale=4)))
        atomic_write_text(tmp / "smoothness.json", json.dumps(
            {**figures, "keys": labels, "frames": args.frames, "schedule": sched.name, "timesteps": list(sched.timesteps),
             "solver": solver.name, "features": args.features, "model": args.model}, indent=2) + "\n")
    run_id = _track(args, figures, out / "strip.png", labels)
    print(f"{len(path)} frames between {', '.join(labels)} ({sched.name}, {solver.name}, {sched.nfe} steps): "
          + ", ".join(f"{k} {v:.4g}" for k, v in figures.items()) + f"; wrote {out}"
          + (f"; MLflow run {run_id}" if run_id else ""))
    return 0
