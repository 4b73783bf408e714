"""`stridelab evaluate`: recon, inversion, FID and KID of schedules at several NFEs, on the same seeds."""

from __future__ import annotations

import argparse
import os

from jobs.common import (SOLVERS, add_deprecated_alias, add_dtype_arg, add_model_arg, add_ray_args, add_seeds_args, add_teacher_nfe_arg,
                         check_actors, check_writable_parent, int_list, name_list, show_names)

DEFAULT_SCHEDULES = "uniform,quadratic,karras,logsnr,time_quadratic"
METRICS = ("recon", "inversion", "fid", "kid")
DEFAULT_METRICS = ("recon", "inversion")


def _check_samples_and_out(args: argparse.Namespace) -> None:
    """Checks both paths share, made before any model is loaded."""
    from pipeline.errors import StridelabError

    if args.num_seeds < 1:
        raise StridelabError(f"--num-seeds must be >= 1, got {args.num_seeds}")
    if args.out and os.path.splitext(args.out)[1] not in (".csv", ".parquet"):
        raise StridelabError(f"--out must end in .csv or .parquet, got {args.out!r}")
    if args.out:
        check_writable_parent(args.out, "--out")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="compare schedules on a model (same seeds for all)",
        description=(
            "Evaluate stride schedules on a model, run by one or more solvers (--solvers). recon: per-dimension "
            "MSE on a [0,1] scale between the n-evaluation output and a many-step DDIM teacher from the same x_T. inversion: encode data with "
            "n steps, decode with n steps (DDIM paper Table 2), where the model can draw data. fid / kid: "
            "of the n-step samples against a reference set (see --fid-ref). With --actors A the seeds are "
            "split over A Ray actors; the numbers do not depend on A."
        ),
    )
    add_model_arg(p)
    p.add_argument("--schedules", type=name_list, default=name_list(DEFAULT_SCHEDULES), metavar="NAMES",
                   help=f"comma-separated schedule names, 'default' (each solver's diffusers set_timesteps(n) spacing) or "
                        f".json files (default {DEFAULT_SCHEDULES})")
    add_deprecated_alias(p, "--schedule", "--schedules", "schedules", type=name_list)
    p.add_argument("--nfe", type=int_list, default=None,
                   help="comma-separated budgets in model evaluations (default 5,10,20; only schedule files: their own)")
    add_seeds_args(p, 256, "seeds (samples) per schedule")
    add_teacher_nfe_arg(p, None)
    p.add_argument("--metrics", type=name_list, default=list(DEFAULT_METRICS),
                   metavar="NAMES", help=f"comma-separated, from {', '.join(METRICS)} (default {','.join(DEFAULT_METRICS)})")
    add_dtype_arg(p)
    add_ray_args(p, 0)
    p.add_argument("--fid-features", default="auto",
                   help="feature extractor: digits[:DIR], pixels, inception, or auto (digits for 1x8x8 samples, "
                        "inception for larger images, pixels otherwise)")
    p.add_argument("--fid-ref", default="auto",
                   help="reference set: digits[:SPLIT], model (exact draws of an analytic model), "
                        "cleanfid:NAME:RES[:SPLIT], or auto (model when it can draw data, else digits)")
    p.add_argument("--teacher-cache", default=None, help="directory to keep teacher outputs in (safetensors)")
    p.add_argument("--out", default=None, help="output file: the table, .csv or .parquet (default: print only)")
    solvers = p.add_argument("--solvers", type=name_list, default=None, metavar="NAMES",
                   help="comma-separated diffusion solvers that run every schedule (%(names)s; default ddim). Given, "
                        "the cross table: each solver also runs its own diffusers default spacing ('default', added), "
                        "at equal model evaluations (--nfe; heun spends 2 per step but 1 on the last; a schedule file "
                        "is log-sigma interpolated to the steps that fit) on the same seeds; column x_default")
    show_names(solvers, SOLVERS)
    p.add_argument("--allow-other-model", action="store_true",
                   help="run a schedule file learned on another model (same T) at its integer timesteps, with a warning")
    add_deprecated_alias(p, "--samplers", "--solvers", "solvers", type=name_list)
    p.set_defaults(param_flags={"solver": "--solvers"})
    p.set_defaults(func=run)


def _reference(args: argparse.Namespace, model):
    """(features, reference) for FID/KID, computed once on the driver, by the policy the sweep uses."""
    from pipeline.metrics.reference import fid_inputs

    return fid_inputs(model, args.fid_features, args.fid_ref, kid="kid" in args.metrics)


def run(args: argparse.Namespace) -> int:
    from pipeline.distributed import SamplerPool
    from pipeline.errors import StridelabError
    from pipeline.evaluation.grid import is_schedule_file, plan_grid
    from pipeline.interop.apply import warn_if_exported_for_other_model
    from pipeline.io.reports import format_table, write_table
    from pipeline.metrics.recon import recon_sem
    from pipeline.models.load import load_model, model_dtype
    from pipeline.core.schedules import Schedule, check_nfe

    _check_samples_and_out(args)
    bad = [m for m in args.metrics if m not in METRICS]
    if bad:
        raise StridelabError(f"unknown metric {bad[0]!r}; choose from {', '.join(METRICS)}")
    check_actors(args)
    model_dtype(args.dtype)
    solvers = args.solvers or ["ddim"]
    specs = list(args.schedules)
    if args.solvers and "default" not in specs:
        specs.append("default")  # each solver next to its own default spacing: the cross table
    model = load_model(args.model)
    T = model.num_train_timesteps
    if args.teacher_nfe is not None:
        check_nfe(args.teacher_nfe, T)
    if args.nfe is None:  # only schedule files (and default): each file at its own step count
        named = [s for s in specs if s != "default"]
        files = [s for s in named if is_schedule_file(s)]
        args.nfe = sorted({Schedule.load(f).nfe for f in files}) if files and len(files) == len(named) else [5, 10, 20]
    # Resolve every cell before any sampling, so a bad name fails in a second, not after the teacher.
    cells = plan_grid(specs, solvers, args.nfe, model.alphas_cumprod, allow_other_model=args.allow_other_model)
    for spec in dict.fromkeys(s for s in specs if is_schedule_file(s)):
        warn_if_exported_for_other_model(Schedule.load(spec), args.model)
    seeds = range(args.seed, args.seed + args.num_seeds)
    extra = [m for m in args.metrics if m in ("fid", "kid")]
    features = reference = None
    if extra:
        features, reference = _reference(args, model)
    has_data = callable(getattr(model.denoiser, "sample_data", None))
    want_inv = "inversion" in args.metrics and has_data
    if "inversion" in args.metrics and not has_data:
        print(f"inversion: {args.model} cannot draw data; skipped")
    recon = "recon" in args.metrics
    where = "in-process" if args.actors == 0 else f"on {args.actors} Ray actors"
    if recon:
        print(f"teacher: {args.teacher_nfe or T}-step DDIM of {args.model} on {args.num_seeds} seeds, {where} ...",
              flush=True)
    results = {}
    with SamplerPool(args.model, seeds, args.teacher_nfe, want_inv, actors=args.actors, recon=recon,
                     extra_metrics=extra, features=features, reference=reference, ray_address=args.ray_address,
                     cache_dir=args.teacher_cache, num_gpus=args.gpus_per_actor, dtype=args.dtype,
                     resources=args.actor_resources, placement_timeout=args.placement_timeout) as pool:
        for solver in solvers:  # one call per solver: its cells run in parallel on the actors
            mine = [c for c in cells if c.solver == solver]
            results.update(zip(map(id, mine), pool.evaluate([c.schedule for c in mine], solver=solver)))
    rows = [_row(args.model, c, results[id(c)], recon_sem) for c in cells]
    _add_vs_default(rows)
    if len(solvers) > 1 or args.solvers:
        print("equal NFE = equal model evaluations: each solver takes the most steps that fit (heun: 2 per step, 1 on "
              "the last); a schedule file with other step counts is log-sigma interpolated (column how)")
    print(f"model {args.model} (T = {T}), {args.num_seeds} seeds from {args.seed}:")
    print(format_table(rows, ["schedule", "solver", "nfe", "steps", "recon", "recon_sem", "x_default", "inversion",
                              "fid", "kid", "how"]))
    if args.out:
        print(f"wrote {write_table(rows, args.out)}")
    return 0


def _row(model: str, cell, res, recon_sem) -> dict:
    row = {"model": model, "schedule": cell.label, "solver": cell.solver, "nfe": cell.nfe, "steps": cell.schedule.nfe,
           "evals": cell.evals}
    if not res.recon.isnan().all():
        row["recon"] = res.recon.mean().item()
        row["recon_sem"] = recon_sem(res.recon)
    if res.inversion is not None:
        row["inversion"] = res.inversion.mean().item()
    row.update(res.extra or {})
    row["how"] = cell.how
    row["timesteps"] = " ".join(map(str, cell.schedule.timesteps))
    return row


def _add_vs_default(rows: list[dict]) -> None:
    """``x_default``: recon / the recon of the same solver's ``default`` row at the same budget."""
    base = {(r["solver"], r["nfe"]): r["recon"] for r in rows if r["schedule"] == "default" and "recon" in r}
    for r in rows:
        b = base.get((r["solver"], r["nfe"]))
        if b and "recon" in r and r["schedule"] != "default":
            r["x_default"] = r["recon"] / b
