"""What the benchmarks with a full and a --quick size share: their report flags and where the report goes, one
flag per budget key, and the machine and load they report beside their figures."""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def add_report_args(p: argparse.ArgumentParser, raw_name: str,
                    quick_help: str = "gmm:ring8 and tiny budgets: a test-sized run of the same code") -> None:
    """``--quick``, ``--from-json``, ``--json`` and ``--doc``, the flags of every such benchmark (`report_paths`)."""
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--from-json", default=None, help="re-render docs/BENCHMARKS.md's section from saved figures")
    p.add_argument("--json", default=None, help=f"where the figures go (default docs/{raw_name}; --quick: none)")
    p.add_argument("--doc", default=None, help="the report whose section is (re)written (default docs/BENCHMARKS.md; "
                                               "--quick: none, the committed figures stay the full run's)")


def report_paths(args: argparse.Namespace, raw: Path, doc: Path) -> tuple[Path | None, Path | None]:
    """(JSON, report) a run writes: the flags where given; a full run defaults to `raw` and `doc`, a --quick run
    writes only what is asked, so a smoke run never replaces the committed figures."""
    if args.quick:
        return (Path(args.json) if args.json else None), (Path(args.doc) if args.doc else None)
    return Path(args.json or raw), Path(args.doc or doc)


def add_budget_args(p: argparse.ArgumentParser, full: Mapping[str, Any], quick: Mapping[str, Any]) -> None:
    """``--key-name`` for every key of `full` (its type), defaulting to None so `budget_plan` can tell unset."""
    for key, v in full.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=type(v), default=None, help=f"default {v} (--quick: {quick[key]})")


def budget_plan(args: argparse.Namespace, full: Mapping[str, Any], quick: Mapping[str, Any]) -> dict[str, Any]:
    """Every budget key: the flag where given, else the full or (``args.quick``) the quick size."""
    base = quick if args.quick else full
    return {k: getattr(args, k) if getattr(args, k) is not None else base[k] for k in full}


def load_averages() -> str:
    """The 1, 5 and 15 minute load averages: figures measured on a busy machine say so."""
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def machine() -> str:
    """"GPU" on a CUDA machine, else e.g. "x86_64, 2 CPUs, no GPU"."""
    import torch

    return "GPU" if torch.cuda.is_available() else f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU"


def publish(raw: Mapping[str, Any], json_path: Path | None, doc: Path | None, text: str, begin: str, end: str) -> None:
    """Write a run's raw figures (atomically) and its section between `begin` and `end` of `doc`, where given (see
    `report_paths`); print the section."""
    from pipeline.io.files import atomic_write_json
    from pipeline.io.reports import replace_section

    if json_path:
        atomic_write_json(Path(json_path), raw)
    if doc:
        replace_section(Path(doc), text, begin, end)
    print(text)
