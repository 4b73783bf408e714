"""Import direction: pipeline/ never imports search/ or jobs/; search/ never imports jobs/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_top_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package,forbidden", [("pipeline", {"search", "jobs"}), ("search", {"jobs"})])
def test_import_direction(package, forbidden):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    for f in files:
        bad = imported_top_modules(f) & forbidden
        assert not bad, f"{f.relative_to(ROOT)} imports {bad}"


def test_no_import_time_side_effects():
    """Importing the packages must not start Ray or MLflow (no ray.init at module top)."""
    import subprocess
    import sys

    code = (
        "import importlib, pkgutil, sys\n"
        "import pipeline, search, jobs\n"
        "for pkg in (pipeline, search, jobs):\n"
        "    for m in pkgutil.iter_modules(pkg.__path__):\n"
        "        importlib.import_module(f'{pkg.__name__}.{m.name}')\n"
        "import ray\n"
        "assert not ray.is_initialized()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
