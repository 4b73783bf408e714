"""What the benchmarks with a full and a --quick size share: one flag per budget key, and the machine and load
they report beside their figures."""

from __future__ import annotations

import argparse
import os
import platform
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


def load_averages() -> str:
    """The 1, 5 and 15 minute load averages: figures measured on a busy machine say so."""
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def machine() -> str:
    """"GPU" on a CUDA machine, else e.g. "x86_64, 2 CPUs, no GPU"."""
    import torch

    return "GPU" if torch.cuda.is_available() else f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU"
