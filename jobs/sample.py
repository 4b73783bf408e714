"""`stridelab sample`: many samples of one schedule through Ray Data, written as Parquet + a grid PNG."""

from __future__ import annotations

import argparse

from jobs.common import (add_deprecated_alias, add_dtype_arg, add_model_arg, add_ray_args, add_seeds_args, add_solver_arg,
                         check_actors, check_out_dir, eta_value)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="draw samples with a schedule (Ray Data actor pool) into a Parquet directory",
        description=(
            "Sample NUM_SEEDS images with a solver (--solver, default DDIM) on a schedule, sharded over a pool of Ray actors. Sample i uses "
            "seed SEED+i alone, so the output is identical for any --actors and --batch-size. Writes "
            "DIR/samples.parquet (seed, schedule, nfe, eta, sample tensor, PNG image), DIR/grid.png and "
            "DIR/schedule.json; DIR appears only when complete."
        ),
    )
    add_model_arg(p)
    p.add_argument("--schedule", required=True,
                   help="the one schedule to sample: a schedule name (needs --nfe) or a schedule .json file")
    p.add_argument("--nfe", type=int, default=None,
                   help="model evaluations (for a named schedule; = steps, except heun: (nfe + 1) // 2 steps)")
    add_solver_arg(p, "runs the schedule")
    add_seeds_args(p, 1024, "how many samples")
    out = p.add_mutually_exclusive_group(required=True)  # a group, so that the old spelling counts as given
    out.add_argument("--out-dir", help="output directory DIR (replaced atomically if it exists)")
    add_deprecated_alias(out, "--out", "--out-dir", "out_dir")
    p.add_argument("--eta", type=eta_value, default=0.0,
                   help="DDIM eta in [0, 1] (default 0: deterministic; > 0 only with --solver ddim)")
    p.add_argument("--batch-size", type=int, default=256, help="samples per Ray Data batch (default %(default)s)")
    add_dtype_arg(p)
    add_ray_args(p, 2)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.distributed import generate_samples, write_sample_dir
    from pipeline.interop.apply import warn_if_exported_for_other_model
    from pipeline.errors import StridelabError
    from pipeline.models.load import load_model, model_dtype
    from pipeline.core.schedules import check_nfe, resolve_schedule
    from pipeline.core.schedules import Schedule
    from pipeline.solvers.registry import get_solver, warn_if_tuned_for_other

    # Validate everything before any Ray start-up or any file is created.
    if args.num_seeds < 1:
        raise StridelabError(f"--num-seeds must be >= 1, got {args.num_seeds}")
    check_actors(args)
    model_dtype(args.dtype)
    if args.batch_size < 1:
        raise StridelabError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.seed < 0:
        raise StridelabError(f"--seed must be >= 0, got {args.seed}")
    out = Path(args.out_dir)
    check_out_dir(args.out_dir)
    solver = get_solver(args.solver)
    if args.eta > 0 and not solver.eta:
        raise StridelabError(f"--eta > 0 needs --solver ddim ({solver.name} is deterministic)")
    model = load_model(args.model)
    steps = None
    if args.nfe is not None:
        check_nfe(args.nfe, model.num_train_timesteps)
        steps = solver.steps_for_budget(args.nfe)
    sched = resolve_schedule(args.schedule, steps, model.alphas_cumprod)
    if steps is not None and sched.nfe != steps:
        raise StridelabError(f"{args.schedule} has {sched.nfe} steps but --nfe {args.nfe} gives {solver.name} {steps}")

    warn_if_tuned_for_other(sched.meta, solver.name)
    warn_if_exported_for_other_model(sched, args.model)
    sched = Schedule(sched.timesteps, sched.num_train_timesteps, sched.name, sched.params,
                     {**sched.meta, "sampled_with": solver.record()})
    batches = generate_samples(args.model, sched.timesteps, args.num_seeds, seed=args.seed, eta=args.eta,
                               actors=args.actors, batch_size=args.batch_size, ray_address=args.ray_address,
                               num_gpus=args.gpus_per_actor, solver=solver.name, dtype=args.dtype,
                               resources=args.actor_resources, placement_timeout=args.placement_timeout)
    path = write_sample_dir(out, batches, num_samples=args.num_seeds, first_seed=args.seed, schedule=sched,
                            eta=args.eta, model=args.model, sample_shape=model.sample_shape,
                            data_range=model.data_range, progress=args.progress,
                            model_dtype=args.dtype)
    print(f"wrote {args.num_seeds} samples of {args.model} ({sched.name}, {solver.name}, {sched.nfe} steps = "
          f"{solver.evaluations(sched.nfe)} model evaluations, eta {args.eta}, {args.dtype}) to {path}")
    return 0
