"""The budget flags of the benchmarks that have a full and a --quick size: one flag per budget key."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any


def add_budget_args(p: argparse.ArgumentParser, full: Mapping[str, Any], quick: Mapping[str, Any]) -> None:
    """``--key-name`` for every key of `full` (its type), defaulting to None so `budget_plan` can tell unset."""
    for key, v in full.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=type(v), default=None, help=f"default {v} (--quick: {quick[key]})")


def budget_plan(args: argparse.Namespace, full: Mapping[str, Any], quick: Mapping[str, Any]) -> dict[str, Any]:
    """Every budget key: the flag where given, else the full or (``args.quick``) the quick size."""
    base = quick if args.quick else full
    return {k: getattr(args, k) if getattr(args, k) is not None else base[k] for k in full}
