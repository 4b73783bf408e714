"""`stridelab schedules`: print the baseline schedules (timesteps and sigmas) or save one as JSON."""

from __future__ import annotations

import argparse

from jobs.common import SCHEDULE_NAMES, add_deprecated_alias, add_model_arg, name_list, show_names


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "schedules",
        help="list the baseline stride schedules for a model",
        description="Print each baseline schedule's timesteps for a given NFE, or save one as JSON.",
    )
    add_model_arg(p)  # its alphas_cumprod defines the sigmas
    p.add_argument("--nfe", type=int, default=10, help="number of steps (default %(default)s)")
    show_names(p.add_argument("--schedules", type=name_list, default=None, metavar="NAMES",
                              help="comma-separated schedule names, from %(names)s (default: all)"), SCHEDULE_NAMES)
    add_deprecated_alias(p, "--names", "--schedules", "schedules", type=name_list)
    p.add_argument("--sigmas", action="store_true", help="print sigmas (k-diffusion style, ending in 0) too")
    p.add_argument("--out", default=None, help="output file: save the one schedule of --schedules as JSON here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.errors import StridelabError
    from pipeline.models.load import load_model
    from pipeline.core.schedules import SCHEDULES, make_schedule

    model = load_model(args.model)
    names = args.schedules or list(SCHEDULES)
    if args.out and len(names) != 1:
        raise StridelabError("--out saves one schedule: give exactly one name with --schedules")
    print(f"{args.model} (T={model.num_train_timesteps}), {args.nfe} steps:")  # its alphas_cumprod place the sigmas
    for name in names:
        s = make_schedule(name, args.nfe, model.alphas_cumprod)
        print(f"{name:>15}: {list(s.timesteps)}")
        if args.sigmas:
            print(f"{'':>15}  sigmas {[round(v, 4) for v in s.sigmas(model.alphas_cumprod).tolist()]}")
        if args.out:
            s.save(args.out)
            print(f"saved {args.out}")
    return 0
