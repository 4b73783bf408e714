"""`stridelab evaluate`: recon (vs a many-step teacher) and inversion error of schedules at several NFEs."""

from __future__ import annotations

import argparse

from jobs.common import int_list, name_list

DEFAULT_SCHEDULES = "uniform,quadratic,karras,logsnr,time_quadratic"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="compare schedules on a model (same seeds for all)",
        description=(
            "Evaluate stride schedules on a model. recon: per-dimension MSE on a [0,1] scale between the "
            "n-step DDIM output and a many-step DDIM teacher from the same x_T. inversion: encode data with "
            "n steps, decode with n steps (DDIM paper Table 2), where the model can draw data."
        ),
    )
    p.add_argument("--model", default="gmm:ring8", help="model spec (default %(default)s)")
    p.add_argument("--schedules", type=name_list, default=name_list(DEFAULT_SCHEDULES),
                   help="comma-separated schedule names or .json files (default %(default)s)")
    p.add_argument("--nfe", type=int_list, default=[5, 10, 20], help="comma-separated NFEs (default 5,10,20)")
    p.add_argument("--num-samples", type=int, default=256, help="samples (seeds) per schedule (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="first seed; seeds are seed..seed+num_samples-1")
    p.add_argument("--teacher-nfe", type=int, default=None, help="teacher steps (default: all T timesteps)")
    p.add_argument("--out", default=None, help="write the table here (.csv or .parquet)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pipeline.evaluation import evaluate_schedule, make_teacher
    from pipeline.errors import StridelabError
    from pipeline.models import load_model
    from pipeline.reports import format_table, write_table
    from pipeline.schedules import check_nfe, resolve_schedule

    if args.num_samples < 1:
        raise StridelabError(f"--num-samples must be >= 1, got {args.num_samples}")
    model = load_model(args.model)
    T = model.num_train_timesteps
    for n in args.nfe:
        check_nfe(n, T)
    # Resolve every schedule before any sampling, so a bad name fails in a second, not after the teacher.
    jobs = [(spec, n, resolve_schedule(spec, n, model.alphas_cumprod)) for n in args.nfe for spec in args.schedules]
    seeds = range(args.seed, args.seed + args.num_samples)
    print(f"teacher: {args.teacher_nfe or T}-step DDIM on {args.num_samples} seeds ...", flush=True)
    teacher = make_teacher(model, seeds, args.teacher_nfe)
    sample_data = getattr(model.denoiser, "sample_data", None)
    data = sample_data(seeds) if sample_data is not None else None
    rows = []
    for spec, n, sched in tqdm(jobs, desc="schedules", unit="sched"):
        m = evaluate_schedule(model, sched, teacher, data)
        rows.append({"model": args.model, "schedule": sched.name if not spec.endswith(".json") else spec,
                     "nfe": sched.nfe, **m, "timesteps": " ".join(map(str, sched.timesteps))})
    print(format_table(rows, ["schedule", "nfe", "recon", "inversion"]))
    if args.out:
        print(f"wrote {write_table(rows, args.out)}")
    return 0
