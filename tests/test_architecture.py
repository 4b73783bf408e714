"""Import direction, one layer at a time: a room imports only the rooms below it.

    errors <- io <- core <- solvers <- models <- metrics <- interop <- training <- evaluation
        <- distributed <- search <- jobs

(`pipeline/errors.py` is the one error type; `pipeline/io` writes files atomically and knows no math.)
Imports inside functions count too: a cycle hidden in a function body is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAYERS = [
    "pipeline.errors", "pipeline.io", "pipeline.core", "pipeline.solvers", "pipeline.models", "pipeline.metrics",
    "pipeline.interop", "pipeline.training", "pipeline.evaluation", "pipeline.distributed", "search", "jobs",
]


def room(module: str) -> str | None:
    """The layer a dotted module name belongs to (``pipeline.core.noise`` -> ``pipeline.core``)."""
    parts = module.split(".")
    if parts[0] == "pipeline" and len(parts) > 1 and f"pipeline.{parts[1]}" in LAYERS:
        return f"pipeline.{parts[1]}"
    return parts[0] if parts[0] in ("search", "jobs") else None


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def project_files() -> list[Path]:
    return sorted(p for pkg in ("pipeline", "search", "jobs") for p in (ROOT / pkg).rglob("*.py"))


def test_every_module_sits_in_a_layer():
    files = project_files()
    assert len(files) > 30
    stray = [f.relative_to(ROOT) for f in files if f != ROOT / "pipeline" / "__init__.py"
             and room(".".join(f.relative_to(ROOT).with_suffix("").parts)) is None]
    assert not stray, f"modules outside every layer: {stray}"


@pytest.mark.parametrize("layer", LAYERS)
def test_import_direction(layer):
    rank = LAYERS.index(layer)
    files = [f for f in project_files() if room(".".join(f.relative_to(ROOT).with_suffix("").parts)) == layer]
    assert files, f"no module in {layer}"
    for f in files:
        above = {m for m in imported_modules(f) if (r := room(m)) is not None and LAYERS.index(r) > rank}
        assert not above, f"{f.relative_to(ROOT)} ({layer}) imports from a layer above it: {sorted(above)}"


def test_no_import_time_side_effects():
    """Importing the packages must not start Ray or MLflow (no ray.init at module top)."""
    import subprocess
    import sys

    code = (
        "import importlib, pkgutil, sys\n"
        "import pipeline, search, jobs\n"
        "for pkg in (pipeline, search, jobs):\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, prefix=pkg.__name__ + '.'):\n"
        "        importlib.import_module(m.name)\n"
        "import ray\n"
        "assert not ray.is_initialized()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
