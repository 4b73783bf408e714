"""Argument parsing helpers shared by the subcommands."""

from __future__ import annotations

import argparse


def int_list(text: str) -> list[int]:
    """'5,10,20' -> [5, 10, 20]; argparse turns the ValueError into a one-line usage error."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def name_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected at least one name")
    return values


def eta_value(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"eta must be a number in [0, 1], got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"eta must be in [0, 1], got {v}")
    return v


def gpus_value(text: str) -> float:
    """--gpus-per-actor: a number; its range is checked once, by the library (`check_gpus`)."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GPUs in (0, 8], got {text!r}") from None


GPUS_HELP = ("GPUs each Ray actor requests, as given (e.g. 1, or 0.5 for two actors per GPU). Needed on an "
             "autoscaling cluster whose GPU workers may be scaled to zero: without it the actors size "
             "themselves from the GPUs present at start (one each), or run on CPUs when there are none")


def check_gpus(args: argparse.Namespace) -> None:
    """--gpus-per-actor in (0, 8] and only with Ray actors: the library's one check, run before any start-up."""
    from pipeline.distributed.pool import check_gpus_per_actor

    check_gpus_per_actor(getattr(args, "gpus_per_actor", None), args.actors)
