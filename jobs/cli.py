"""The `stridelab` command. Each subcommand lives in its own module with `register(subparsers)`.

Bad input raises `StridelabError` (or a validator's `ValueError`); here it becomes one line on stderr
and exit code 2, never a traceback. Heavy imports (torch, ray, mlflow) happen inside each command's
`run`, so `stridelab --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = ["jobs.schedules_cmd", "jobs.evaluate", "jobs.train", "jobs.sample", "jobs.sweep", "jobs.export", "jobs.ui"]

DESCRIPTION = """\
stridelab learns where a DDIM sampler should place its steps.

Typical use:
  stridelab schedules --nfe 10                      # the baseline stride schedules, side by side
  stridelab evaluate --model gmm:ring8 --nfe 5,10   # recon / inversion error of each schedule
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    from pipeline.errors import StridelabError

    try:
        return int(args.func(args) or 0)
    except (StridelabError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"stridelab {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # Output piped into `head` and closed early: not an error. Silence the flush at exit.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"stridelab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
