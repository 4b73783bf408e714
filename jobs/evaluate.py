"""`stridelab evaluate`: recon, inversion, FID and KID of schedules at several NFEs, on the same seeds."""

from __future__ import annotations

import argparse
import os

from jobs.common import (SOLVERS, add_deprecated_alias, add_model_arg, add_ray_args, add_seeds_args, add_teacher_nfe_arg,
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
            "Evaluate stride schedules on a model. recon: per-dimension MSE on a [0,1] scale between the "
            "n-step DDIM output and a many-step DDIM teacher from the same x_T. inversion: encode data with "
            "n steps, decode with n steps (DDIM paper Table 2), where the model can draw data. fid / kid: "
            "of the n-step samples against a reference set (see --fid-ref). With --actors A the seeds are "
            "split over A Ray actors; the numbers do not depend on A."
        ),
    )
    add_model_arg(p)
    p.add_argument("--schedules", type=name_list, default=name_list(DEFAULT_SCHEDULES), metavar="NAMES",
                   help=f"comma-separated schedule names or .json files (default {DEFAULT_SCHEDULES})")
    add_deprecated_alias(p, "--schedule", "--schedules", "schedules", type=name_list)
    p.add_argument("--nfe", type=int_list, default=None,
                   help="comma-separated NFEs (default 5,10,20; with --solvers: model evaluations, default the schedule's)")
    add_seeds_args(p, 256, "seeds (samples) per schedule")
    add_teacher_nfe_arg(p, None)
    p.add_argument("--metrics", type=name_list, default=list(DEFAULT_METRICS),
                   metavar="NAMES", help=f"comma-separated, from {', '.join(METRICS)} (default {','.join(DEFAULT_METRICS)})")
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
                   help="transfer table: run ONE schedule (--schedules FILE.json or one name) in each of these diffusion "
                        "solvers (%(names)s) and each solver's default spacing, at equal model evaluations (--nfe; Heun "
                        "spends 2 per step but 1 on the last) and the same seeds; recon only")
    show_names(solvers, SOLVERS)
    add_deprecated_alias(p, "--samplers", "--solvers", "solvers", type=name_list)
    p.set_defaults(func=run)


def _reference(args: argparse.Namespace, model):
    """(features, reference) for FID/KID, computed once on the driver, by the policy the sweep uses."""
    from pipeline.metrics.reference import fid_inputs

    return fid_inputs(model, args.fid_features, args.fid_ref, kid="kid" in args.metrics)


def run_solvers(args: argparse.Namespace) -> int:
    """--solvers: the transfer table of `pipeline.evaluation.transfer` (in this process)."""

    from pipeline.errors import StridelabError
    from pipeline.evaluation.inprocess import make_teacher
    from pipeline.models.load import load_model
    from pipeline.io.reports import format_table, write_table
    from pipeline.core.schedules import check_nfe, make_schedule, resolve_schedule
    from pipeline.evaluation.transfer import SAMPLER_NAMES, transfer_table

    bad = [s for s in args.solvers if s not in SAMPLER_NAMES]
    if bad:
        raise StridelabError(f"unknown sampler {bad[0]!r}; choose a diffusion solver from {', '.join(SAMPLER_NAMES)}")
    if len(args.schedules) != 1:
        raise StridelabError("--solvers compares one schedule with each solver's default: pass --schedules FILE.json "
                             "(or one schedule name with --nfe)")
    if args.actors:
        raise StridelabError("--solvers runs in this process; drop --actors")
    if args.gpus_per_actor is not None:
        raise StridelabError("--solvers runs in this process; drop --gpus-per-actor")
    _check_samples_and_out(args)
    model = load_model(args.model)
    T = model.num_train_timesteps
    spec = args.schedules[0]
    is_file = spec.endswith(".json") or os.sep in spec
    if not is_file and args.nfe is None:
        raise StridelabError(f"schedule {spec!r} needs --nfe")
    schedule = resolve_schedule(spec, None, model.alphas_cumprod) if is_file else None
    for n in args.nfe or []:
        check_nfe(n, T)
    if args.teacher_nfe is not None:
        check_nfe(args.teacher_nfe, T)
    seeds = range(args.seed, args.seed + args.num_seeds)
    print(f"teacher: {args.teacher_nfe or T}-step DDIM on {args.num_seeds} seeds, in-process ...", flush=True)
    teacher = make_teacher(model, seeds, args.teacher_nfe)
    rows = []
    for n in args.nfe or [schedule.nfe]:
        if schedule is not None:
            rows += transfer_table(model, teacher, schedule, args.solvers, n, label=spec)
        else:
            rows += transfer_table(model, teacher, lambda m: make_schedule(spec, m, model.alphas_cumprod),
                                   args.solvers, n, label=spec)
    print("equal NFE = equal model evaluations: each sampler takes the most steps that fit (Heun: 2 per step, 1 on "
          "the last); a schedule with other step counts is log-sigma interpolated (column how)")
    print(format_table(rows, ["sampler", "spacing", "nfe", "steps", "evals", "recon", "recon_sem", "vs_default",
                              "t_rounded", "how"]))
    if args.out:
        print(f"wrote {write_table(rows, args.out)}")
    return 0


def run(args: argparse.Namespace) -> int:

    if getattr(args, "solvers", None):
        return run_solvers(args)
    if args.nfe is None:
        args.nfe = [5, 10, 20]

    from pipeline.distributed import SamplerPool
    from pipeline.errors import StridelabError
    from pipeline.metrics.recon import recon_sem
    from pipeline.models.load import load_model
    from pipeline.io.reports import format_table, write_table
    from pipeline.core.schedules import check_nfe, resolve_schedule

    _check_samples_and_out(args)
    bad = [m for m in args.metrics if m not in METRICS]
    if bad:
        raise StridelabError(f"unknown metric {bad[0]!r}; choose from {', '.join(METRICS)}")
    check_actors(args)
    model = load_model(args.model)
    T = model.num_train_timesteps
    for n in args.nfe:
        check_nfe(n, T)
    if args.teacher_nfe is not None:
        check_nfe(args.teacher_nfe, T)
    # Resolve every schedule before any sampling, so a bad name fails in a second, not after the teacher.
    jobs = [(spec, n, resolve_schedule(spec, n, model.alphas_cumprod)) for n in args.nfe for spec in args.schedules]
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
        print(f"teacher: {args.teacher_nfe or T}-step DDIM on {args.num_seeds} seeds, {where} ...", flush=True)
    with SamplerPool(args.model, seeds, args.teacher_nfe, want_inv, actors=args.actors, recon=recon,
                     extra_metrics=extra, features=features, reference=reference, ray_address=args.ray_address,
                     cache_dir=args.teacher_cache, num_gpus=args.gpus_per_actor) as pool:
        results = pool.evaluate([s for _, _, s in jobs])
    rows = []
    for (spec, _n, sched), res in zip(jobs, results):
        row = {"model": args.model, "schedule": sched.name if not spec.endswith(".json") else spec, "nfe": sched.nfe}
        if recon:
            rec = res.recon
            row["recon"] = rec.mean().item()
            row["recon_sem"] = recon_sem(rec)
        if res.inversion is not None:
            row["inversion"] = res.inversion.mean().item()
        row.update(res.extra or {})
        row["timesteps"] = " ".join(map(str, sched.timesteps))
        rows.append(row)
    print(format_table(rows, ["schedule", "nfe", "recon", "inversion", "fid", "kid"]))
    if args.out:
        print(f"wrote {write_table(rows, args.out)}")
    return 0
