"""The evaluation grid: schedules x solvers x budgets, at equal model evaluations (the cross table).

For a budget of N model evaluations each solver runs the most steps m that fit
(`SolverSpec.steps_for_budget`: m = N, Heun (N + 1) // 2). Each cell's schedule at m steps is

==================  ==================================================================================
spec                schedule
==================  ==================================================================================
``default``         the solver's own diffusers ``set_timesteps(m)`` spacing (`pipeline.interop.defaults`)
a schedule name     that baseline built at m steps (`pipeline.core.schedules.make_schedule`)
a ``.json`` file    the file's schedule; with n != m steps it is log-sigma interpolated to m (Align Your
                    Steps' rule, `pipeline.core.schedules.interpolated`), and the ``how`` column says so
==================  ==================================================================================

so a schedule learned for solver A shows up in solver B's row next to B's own default: the cross
table. A schedule file is checked against the model's noise table (`check_compatible`); one learned
on another model is refused unless ``allow_other_model`` (then the same integer timesteps are run, as a
diffusers ``timesteps=`` user would, and a warning says the noise levels differ).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipeline.core.noise import as_alphas_cumprod
from pipeline.core.schedules import Schedule, check_nfe, interpolated, make_schedule
from pipeline.interop.apply import check_compatible
from pipeline.interop.defaults import default_spacing
from pipeline.solvers.registry import get_solver


@dataclass(frozen=True)
class GridCell:
    """One (schedule spec, solver, budget) of the grid.

    Attributes:
        label: the schedule spec as given (a name, ``default`` or a file path).
        solver: the solver that runs it.
        nfe: the budget in model evaluations.
        schedule: what runs, at ``solver.steps_for_budget(nfe)`` steps.
        how: how the schedule was obtained ("as is", "log-sigma interpolated 10->5 steps", ...).
    """

    label: str
    solver: str
    nfe: int
    schedule: Schedule
    how: str

    @property
    def evals(self) -> int:
        return get_solver(self.solver).evaluations(self.schedule.nfe)


def is_schedule_file(spec: str) -> bool:
    return spec.endswith(".json") or os.sep in spec


def carry_to_steps(schedule: Schedule, m: int, alphas_cumprod: torch.Tensor | Sequence[float]) -> Schedule:
    """`schedule` itself when it has m steps, else its log-sigma interpolation to m steps (same end points)."""
    if schedule.nfe == m:
        return schedule
    s = interpolated(m, alphas_cumprod, reference=schedule.timesteps)
    return Schedule(s.timesteps, s.num_train_timesteps, f"{schedule.name}@{m}",
                    {"interpolated_from": list(schedule.timesteps)}, dict(schedule.meta))


def plan_grid(
    specs: Sequence[str],
    solvers: Sequence[str],
    budgets: Sequence[int],
    alphas_cumprod: torch.Tensor | Sequence[float],
    *,
    allow_other_model: bool = False,
) -> list[GridCell]:
    """Every cell of the grid, budget-major, then solver, then schedule (files are read once).

    Raises:
        StridelabError: an unknown solver or schedule name, an unreadable or incompatible file, a budget
            out of range for the model.
    """
    abar = as_alphas_cumprod(alphas_cumprod)
    T = abar.numel()
    specs_ = [get_solver(s) for s in solvers]
    files = {}
    for spec in specs:
        if is_schedule_file(spec):
            files[spec] = Schedule.load(spec)
            check_compatible(files[spec], abar, what="the model", allow_other_model=allow_other_model,
                             warn_unhashed=True)
    cells = []
    for n in budgets:
        check_nfe(n, T)
        for sv in specs_:
            m = sv.steps_for_budget(n)
            for spec in specs:
                if spec in files:
                    sched = carry_to_steps(files[spec], m, abar)
                    how = "as is" if sched is files[spec] else f"log-sigma interpolated {files[spec].nfe}->{m} steps"
                elif spec == "default":
                    sched = default_spacing(sv.name, m, abar)
                    how = sched.params["how"]
                else:
                    sched, how = make_schedule(spec, m, abar), "as is"
                cells.append(GridCell(spec, sv.name, n, sched, how))
    return cells
