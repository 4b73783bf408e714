"""The `stridelab` command. Each subcommand lives in its own module with `register(subparsers)`.

Bad input raises `StridelabError`; here it becomes one line on stderr and exit code 2, with every
parameter the library names in backticks rendered as this command's flag. Any other exception is a bug
and keeps its traceback. Heavy imports (torch, ray, mlflow) happen inside each command's
`run`, so `stridelab --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from pathlib import Path
from typing import Any

from jobs.common import add_output_args, apply_output_policy

COMMAND_MODULES = ["jobs.schedules_cmd", "jobs.evaluate", "jobs.train", "jobs.sample", "jobs.invert", "jobs.interpolate", "jobs.sweep", "jobs.export", "jobs.ui", "jobs.report"]

DESCRIPTION = """\
stridelab learns where a DDIM sampler should place its steps.

The main job:
  stridelab sweep                                   # learn a 10-step schedule for the bundled digits DDPM
                                                    # (bundled:digits; results/sweep/, MLflow in ./mlflow.db)
Also:
  stridelab schedules --nfe 10                      # the baseline stride schedules, side by side
  stridelab evaluate --model gmm:ring8 --nfe 5,10   # recon / inversion error of each schedule
  stridelab export --study-name NAME                # a sweep's schedule as JSON
  stridelab invert --images DIR --schedule uniform --nfe 10 --out-dir inv   # images -> noise -> images
  stridelab interpolate --seeds 1,2 --schedule uniform --nfe 10 --out-dir morph  # a slerp morph
One vocabulary: --model (default bundled:digits), --num-seeds and --seed, --actors, --out (a file), --out-dir (a directory).
"""


def build_parser() -> argparse.ArgumentParser:
    from pipeline import __version__

    parser = argparse.ArgumentParser(
        prog="stridelab", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"stridelab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for command in {id(c): c for c in leaf_parsers(parser)}.values():  # an alias maps to the same parser
        add_output_args(command)
    return parser


def leaf_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers that run something (``sweep``, ``train digits``): where the shared output flags go."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [parser]
    return [leaf for a in subs for child in a.choices.values() for leaf in leaf_parsers(child)]


def flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Parameter (argparse dest) -> its flag, for `parser` and the subparsers below it."""
    flags: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                flags = {**flag_names(child), **flags}
        elif action.option_strings:
            flags.setdefault(action.dest, next((o for o in action.option_strings if o.startswith("--")),
                                               action.option_strings[0]))
    return flags


def error_line(exc, parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """One line for a `StridelabError`: library parameter names become this command's flags."""
    flags = {**flag_names(parser), **getattr(args, "param_flags", {})}
    msg = exc.render(flags.get).splitlines()
    return msg[0] if msg and msg[0] else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    from pipeline.errors import StridelabError

    args.argv = list(sys.argv[1:] if argv is None else argv)  # what was typed, for hints such as resume_hint
    apply_output_policy(args)
    default_format = warnings.formatwarning
    warnings.formatwarning = _warning_line(args.command, default_format)
    try:
        return int(args.func(args) or 0)
    except StridelabError as e:
        command = parser._subparsers._group_actions[0].choices[args.command]
        from pipeline.errors import PlacementTimeout

        hint = getattr(args, "resume_hint", None) if isinstance(e, PlacementTimeout) else None
        print(f"stridelab {args.command}: error: {error_line(e, command, args)}"
              + (f"; continue with: {hint}" if hint else ""), file=sys.stderr)
        return 2
    except BrokenPipeError:
        # Output piped into `head` and closed early: not an error. Silence the flush at exit.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        # A command that can be continued says how (`args.resume_hint`, set once it knows, e.g. the study name).
        hint = getattr(args, "resume_hint", None)
        print(f"stridelab {args.command}: interrupted" + (f"; continue with: {hint}" if hint else ""), file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = default_format


_OURS = tuple(str(Path(__file__).resolve().parents[1] / d) for d in ("pipeline", "search", "jobs"))


def _warning_line(command: str, default: Any) -> Any:
    """``warnings.formatwarning`` for the CLI: a warning raised by stridelab's own code is one line,
    ``stridelab CMD: warning: ...`` (the Python API keeps plain warnings); any other keeps Python's format."""

    def fmt(message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None) -> str:
        if str(filename).startswith(_OURS):
            return f"stridelab {command}: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    return fmt


if __name__ == "__main__":
    sys.exit(main())
