"""`stridelab schedules`: print the baseline schedules (timesteps and sigmas) or save one as JSON."""

from __future__ import annotations

import argparse

from jobs.common import name_list


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "schedules",
        help="list the baseline stride schedules for a model",
        description="Print each baseline schedule's timesteps for a given NFE, or save one as JSON.",
    )
    p.add_argument("--model", default="gmm:ring8", help="model spec whose alphas_cumprod defines sigmas (default %(default)s)")
    p.add_argument("--nfe", type=int, default=10, help="number of steps (default %(default)s)")
    p.add_argument("--names", type=name_list, default=None, help="comma-separated schedule names (default: all)")
    p.add_argument("--sigmas", action="store_true", help="print sigmas (k-diffusion style, ending in 0) too")
    p.add_argument("--out", default=None, help="save the (single) named schedule as JSON here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.errors import StridelabError
    from pipeline.models.load import load_model
    from pipeline.core.schedules import SCHEDULES, make_schedule

    model = load_model(args.model)
    names = args.names or list(SCHEDULES)
    if args.out and len(names) != 1:
        raise StridelabError("--out saves one schedule: give exactly one name with --names")
    for name in names:
        s = make_schedule(name, args.nfe, model.alphas_cumprod)
        print(f"{name:>15}: {list(s.timesteps)}")
        if args.sigmas:
            print(f"{'':>15}  sigmas {[round(v, 4) for v in s.sigmas(model.alphas_cumprod).tolist()]}")
        if args.out:
            s.save(args.out)
            print(f"saved {args.out}")
    return 0
