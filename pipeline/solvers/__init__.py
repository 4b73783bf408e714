"""Samplers over an explicit timestep list: the solver family by name (`SOLVERS`, `get_solver`, `solve`).

DDIM (eta, inversion) is the core, the teacher and the inverter; Euler, Heun, DPM-Solver++ 2M/3M, UniPC
and iPNDM follow the same contract (`pipeline.solvers.base`).
"""

from __future__ import annotations

from pipeline.solvers.base import SolverSpec
from pipeline.solvers.ddim import ddim_invert, ddim_sample, ddim_step
from pipeline.solvers.registry import DEFAULT_SOLVER, SOLVER_NAMES, SOLVERS, get_solver, solve

__all__ = ["DEFAULT_SOLVER", "SOLVERS", "SOLVER_NAMES", "SolverSpec", "ddim_invert", "ddim_sample", "ddim_step",
           "get_solver", "solve"]
