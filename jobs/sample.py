"""`stridelab sample`: many samples of one schedule through Ray Data, written as Parquet + a grid PNG."""

from __future__ import annotations

import argparse

from jobs.common import GPUS_HELP, check_gpus, eta_value, gpus_value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="draw samples with a schedule (Ray Data actor pool) into a Parquet directory",
        description=(
            "Sample NUM_SAMPLES images with DDIM on a schedule, sharded over a pool of Ray actors. Sample i uses "
            "seed SEED+i alone, so the output is identical for any --actors and --batch-size. Writes "
            "DIR/samples.parquet (seed, schedule, nfe, eta, sample tensor, PNG image), DIR/grid.png and "
            "DIR/schedule.json; DIR appears only when complete."
        ),
    )
    p.add_argument("--model", default="gmm:ring8", help="model spec (default %(default)s)")
    p.add_argument("--schedule", required=True, help="schedule name (needs --nfe) or a schedule .json file")
    p.add_argument("--nfe", type=int, default=None, help="number of steps (for a named schedule)")
    p.add_argument("--num-samples", type=int, default=1024, help="how many samples (default %(default)s)")
    p.add_argument("--actors", type=int, default=2, help="Ray actors; 0 = in this process (default %(default)s)")
    p.add_argument("--out", required=True, help="output directory (replaced atomically if it exists)")
    p.add_argument("--eta", type=eta_value, default=0.0, help="DDIM eta in [0, 1] (default 0: deterministic)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=256, help="samples per Ray Data batch (default %(default)s)")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--gpus-per-actor", type=gpus_value, default=None, help=GPUS_HELP)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.distributed import generate_samples, write_sample_dir
    from pipeline.errors import StridelabError
    from pipeline.models.load import load_model
    from pipeline.core.schedules import check_nfe, resolve_schedule

    # Validate everything before any Ray start-up or any file is created.
    if args.num_samples < 1:
        raise StridelabError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.actors < 0:
        raise StridelabError(f"--actors must be >= 0 (0 = in-process), got {args.actors}")
    check_gpus(args)
    if args.batch_size < 1:
        raise StridelabError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.seed < 0:
        raise StridelabError(f"--seed must be >= 0, got {args.seed}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise StridelabError(f"--out {out} exists and is not a directory")
    model = load_model(args.model)
    if args.nfe is not None:
        check_nfe(args.nfe, model.num_train_timesteps)
    sched = resolve_schedule(args.schedule, args.nfe, model.alphas_cumprod)
    if args.nfe is not None and sched.nfe != args.nfe:
        raise StridelabError(f"{args.schedule} has {sched.nfe} steps but --nfe is {args.nfe}")

    batches = generate_samples(args.model, sched.timesteps, args.num_samples, seed=args.seed, eta=args.eta,
                               actors=args.actors, batch_size=args.batch_size, ray_address=args.ray_address,
                               num_gpus=args.gpus_per_actor)
    path = write_sample_dir(out, batches, num_samples=args.num_samples, first_seed=args.seed, schedule=sched,
                            eta=args.eta, model=args.model, sample_shape=model.sample_shape,
                            data_range=model.data_range, progress=not args.no_progress)
    print(f"wrote {args.num_samples} samples ({sched.name}, nfe {sched.nfe}, eta {args.eta}) to {path}")
    return 0
