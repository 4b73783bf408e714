"""The flags the subcommands share, defined once: same name, same meaning, same default everywhere.

Choice lists in help come from the library's registries, imported only when a subcommand's help is
printed (`LazyChoices`), so `stridelab --help` stays instant. Old spellings stay as hidden
aliases that print one deprecation line on stderr (`add_deprecated_alias`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterator

DEFAULT_MODEL = "bundled:digits"
"""The model of every subcommand: the bundled digits DDPM (ships in pipeline/assets, loads offline)."""

MODEL_HELP = (
    "model spec: gmm:NAME (analytic Gaussian mixture: ring8, gauss, blobs64), bundled:NAME (shipped with "
    "stridelab: digits), a local diffusers directory (DDPM/DDIM pipeline, UNet2DModel folder or a "
    "Stable-Diffusion-style latent pipeline, which takes options DIR?prompt=TEXT&negative_prompt=TEXT&guidance=7.5), "
    "or a Hugging Face Hub id [hf:]ORG/NAME (safetensors only) (default %(default)s)"
)

GPUS_HELP = ("GPUs each Ray actor requests, as given, in (0, 8] (e.g. 1, or 0.5 for two actors per GPU); needs "
             "--actors >= 1. Needed on an autoscaling cluster whose GPU workers may be scaled to zero: without "
             "it the actors size themselves from the GPUs present at start (one each), or run on CPUs when "
             "there are none")


class LazyChoices:
    """A registry's names, read from ``module.attr`` on first use (the registries import torch/optuna).

    Help lists them through `show_names`; the values are checked by the library, whose StridelabError
    is one line (argparse's own errors print a usage block first).
    """

    def __init__(self, module: str, attr: str, extra: tuple[str, ...] = ()):
        self.module, self.attr, self.extra = module, attr, extra

    def names(self) -> list[str]:
        return [*getattr(importlib.import_module(self.module), self.attr), *self.extra]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __str__(self) -> str:
        return ", ".join(self.names())


SCHEDULE_NAMES = LazyChoices("pipeline.core.schedules", "SCHEDULES")
OPTUNA_SAMPLERS = LazyChoices("search.study", "SAMPLERS")
SOLVERS = LazyChoices("pipeline.solvers.registry", "SOLVER_NAMES")
WARM_STARTS = LazyChoices("search.sweep", "ALL_BASELINES")


def show_names(action: argparse.Action, registry: LazyChoices) -> argparse.Action:
    """Let `action`'s help say ``%(names)s``: the registry's names, read only when help is printed. The value
    itself is checked by the library (one StridelabError line), not by argparse."""
    action.names = registry
    return action


def add_solver_arg(p: argparse.ArgumentParser, what: str) -> None:
    """``--solver NAME``: the diffusion solver that runs every schedule (`pipeline.solvers`)."""
    show_names(p.add_argument("--solver", metavar="NAME", default="ddim",
                              help=f"diffusion solver that {what}: %(names)s; NFE counts model evaluations "
                                   "(heun: 2 per step, 1 on the last) (default %(default)s)"), SOLVERS)


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


def teacher_nfe_value(text: str) -> int | None:
    """--teacher-nfe: a step count; 0 means every training timestep (stored as None, as the library reads it)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer (0 = every training timestep), got {text!r}") from None
    return None if v == 0 else v


class _Deprecated(argparse.Action):
    """An old spelling: stores like the new flag, after one line on stderr."""

    def __init__(self, option_strings, dest, new: str, flag: bool = False, **kw):
        self.new, self.flag = new, flag
        if flag:
            kw["nargs"] = 0
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{option_string} is deprecated, use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, self.const if self.flag else values)


def add_deprecated_alias(p, old: str, new: str, dest: str, **kw) -> None:
    """Accept `old` as a hidden spelling of `new` (same `dest`, same `type`); it warns once on stderr."""
    p.add_argument(old, dest=dest, action=_Deprecated, new=new, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kw)


def add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)


DTYPES = LazyChoices("pipeline.models.load", "DTYPES")


def add_dtype_arg(p: argparse.ArgumentParser) -> None:
    """``--dtype NAME``: the network's dtype (sample / evaluate / sweep); checked by `pipeline.models.load.model_dtype`."""
    show_names(p.add_argument("--dtype", metavar="NAME", default="float32",
                              help="dtype the network runs in: %(names)s (bfloat16/float16 pay on a GPU; the "
                                   "sampler's state stays float32, its coefficients float64) (default %(default)s)"),
               DTYPES)


def add_seeds_args(p: argparse.ArgumentParser, default: int, what: str) -> None:
    """--num-seeds N and --seed S: seeds S .. S+N-1, one per sample (old spelling --num-samples)."""
    p.add_argument("--num-seeds", type=int, default=default, help=f"{what}: seeds --seed .. --seed + N - 1, "
                                                                  "one per sample (default %(default)s)")
    add_deprecated_alias(p, "--num-samples", "--num-seeds", "num_seeds", type=int)
    p.add_argument("--seed", type=int, default=0, help="first seed (default %(default)s)")


def add_teacher_nfe_arg(p: argparse.ArgumentParser, default: int | None) -> None:
    shown = "every training timestep" if default is None else default
    p.add_argument("--teacher-nfe", type=teacher_nfe_value, default=default,
                   help=f"steps of the uniform DDIM teacher; 0 = every training timestep (default {shown})")


def add_ray_args(p: argparse.ArgumentParser, actors: int) -> None:
    """--actors, --ray-address, --gpus-per-actor, --actor-resources and --placement-timeout: where the work runs."""
    p.add_argument("--actors", type=int, default=actors, help="Ray actors; 0 = in this process (default %(default)s)")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--gpus-per-actor", type=gpus_value, default=None, help=GPUS_HELP)
    p.add_argument("--actor-resources", metavar="JSON", default=None,
                   help="custom Ray resources each actor requests, a JSON object such as '{\"sweep_node\": 1}': the "
                        "actors then run only on nodes started with `ray start --resources` naming them (needs "
                        "--actors >= 1)")
    p.add_argument("--placement-timeout", type=float, default=None, metavar="SECONDS",
                   help="stop with an error after waiting this long while no live Ray node can host the actors "
                        "(their node lost and no other fits, or none has --actor-resources); a sweep's study "
                        "stays intact for --resume; 0: no limit (default 600)")


def add_tracking_args(p: argparse.ArgumentParser, experiment: str) -> None:
    """--tracking-uri, --experiment, --no-mlflow (dest ``track``): where and whether a run is tracked in MLflow."""
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--experiment", default=None, help=f"MLflow experiment (default {experiment})")
    p.add_argument("--no-mlflow", dest="track", action="store_false", help="do not track in MLflow")


def check_actors(args: argparse.Namespace) -> None:
    """--actors >= 0 and --gpus-per-actor in (0, 8] only with actors: checked before any Ray start-up."""
    from pipeline.distributed import check_gpus_per_actor
    from pipeline.errors import StridelabError

    from pipeline.distributed import check_placement_timeout, parse_actor_resources

    if args.actors < 0:
        raise StridelabError(f"--actors must be >= 0 (0 = in this process), got {args.actors}")
    check_gpus_per_actor(getattr(args, "gpus_per_actor", None), args.actors)
    if getattr(args, "actor_resources", None) is not None:
        args.actor_resources = parse_actor_resources(args.actor_resources)
        if args.actors < 1:
            raise StridelabError("needs Ray actors (`actors` >= 1)", param="actor_resources")
    if hasattr(args, "placement_timeout"):
        check_placement_timeout(args.placement_timeout)


def check_writable_parent(path: str, flag: str) -> None:
    """Fail in one line, before any work, when `path` could never be created: its nearest existing
    ancestor is a file (e.g. /dev/null/x, where mkdir would end in a FileExistsError traceback)."""
    from pathlib import Path

    from pipeline.errors import StridelabError

    parent = Path(path).absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise StridelabError(f"{flag} {path}: {parent} is not a directory")


def check_out_dir(path: str, flag: str = "--out-dir") -> None:
    """An output directory a command may (atomically) replace: not an existing file, and creatable."""
    from pathlib import Path

    from pipeline.errors import StridelabError

    if Path(path).exists() and not Path(path).is_dir():
        raise StridelabError(f"{flag} {path} exists and is not a directory")
    check_writable_parent(path, flag)


# -- what a command shows on stderr: the one policy, applied by jobs/cli.py before every subcommand runs --------

QUIET_ENV = {
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # "Creating initial MLflow database tables..." and other INFO lines
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}
"""Environment of a quiet command (the default). Set before mlflow, diffusers or Ray is imported (the CLI
imports them inside each command) and inherited by Ray's worker processes; a value the user already set wins.
Not ``RAY_BACKEND_LOG_LEVEL``: Ray's C++ logger announces that variable with a line of its own on every start.
Ray's own Python logging and its worker forwarding are quieted where Ray starts (`init_ray`)."""


def add_output_args(p: argparse.ArgumentParser) -> None:
    """--verbose and --no-progress, on every subcommand."""
    p.add_argument("--verbose", action="store_true",
                   help="also show third-party output (Ray's worker logs and warnings, MLflow and diffusers info)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars (they are drawn on stderr only when it is a terminal)")


def apply_output_policy(args: argparse.Namespace) -> None:
    """Quiet third-party output unless ``--verbose``; bars unless ``--no-progress`` (`pipeline.io.console`)."""
    import os

    from pipeline.io import console

    verbose = bool(getattr(args, "verbose", False))
    console.configure(progress=bool(getattr(args, "progress", True)), verbose=verbose)
    if not verbose:
        for k, v in QUIET_ENV.items():
            os.environ.setdefault(k, v)
