"""Dynamic-programming step placement against the teacher trajectory (in the spirit of GITS, Chen et al.
2024, "On the Trajectory Regularity of ODE-based Diffusion Sampling", and OSS, optimal step size).

1. Run the teacher (uniform DDIM over `teacher_nfe` steps, the same teacher as
   `pipeline.metrics.teacher`) from the seeds' x_T and record its state x_t at every point of a
   candidate grid (a subset of the teacher's own timesteps, so the recorded states are exact).
2. cost[i, j] = per-dimension MSE on the [0, 1] scale, averaged over the seeds, between one DDIM jump
   from the teacher state at grid point i to grid point j and the teacher state at j. Column G (one past
   the grid) is the final jump to abar = 1, compared with the teacher's x_0. One denoiser call per grid
   point; the jumps themselves are arithmetic.
3. The n-step path from the noisiest grid point (where x_T lives) to clean that minimises the summed
   cost: cheapest[k][j] = min_i cheapest[k-1][i] + cost[i, j], O(n G^2).

Free start (``free_start=True``, baseline ``dp_free``): x_T is pure noise at every high timestep, so a
sampler may feed it to the model as if it stood at any grid point i (uniform-leading starts at 900, not
999). start[i, j] is the one-jump error from x_T evaluated at grid i to the teacher state at j (one more
denoiser call per grid point); the first jump of the path uses it, so the DP also chooses where to start.
On the bundled digits model at NFE 10 this is 0.87x uniform's held-out recon; from grid 0 it is 4.5x
(the model is poor at t near T, where every fixed-start path must begin).

The accumulated one-jump error is a proxy (errors compound along a real n-step trajectory), which is
why the result is also a warm start for the search rather than the final answer.

Example:
    >>> from pipeline.models.load import load_model
    >>> model = load_model("gmm:ring8")
    >>> sched = dp_schedule(model, 10, seeds=range(32), teacher_nfe=250)
    >>> sched.nfe, sched.name
    (10, 'dp')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import StridelabError
from pipeline.io.console import progress
from pipeline.metrics.teacher import run_teacher, teacher_timesteps
from pipeline.models.load import LoadedModel
from pipeline.core.noise import log_snr_from_abar
from pipeline.core.schedules import Schedule, check_nfe
from pipeline.core.seeds import initial_noise


@dataclass(frozen=True)
class TeacherTrajectory:
    """Teacher states on a grid of timesteps.

    Attributes:
        grid: decreasing timesteps [G], grid[0] = the teacher's first (noisiest) timestep.
        states: x at each grid timestep, [G, B, ...] (states[0] = x_T).
        x0: the teacher's output [B, ...].
    """

    grid: tuple[int, ...]
    states: torch.Tensor
    x0: torch.Tensor


def candidate_grid(teacher_ts: Sequence[int], alphas_cumprod: torch.Tensor, size: int) -> tuple[int, ...]:
    """About `size` points of the teacher's timesteps: half even in t, half even in logSNR (dense where the
    clean end needs it), always including the teacher's first timestep."""
    ts = np.asarray(teacher_ts, dtype=np.int64)  # decreasing
    if size >= ts.size:
        return tuple(int(v) for v in ts)
    lam = log_snr_from_abar(torch.as_tensor(alphas_cumprod, dtype=torch.float64)[ts]).numpy()  # increasing
    half = max(size // 2, 2)
    even_t = np.linspace(0, ts.size - 1, half).round().astype(int)
    targets = np.linspace(lam[0], lam[-1], half)
    even_lam = np.clip(np.searchsorted(lam, targets), 0, ts.size - 1)
    idx = np.unique(np.concatenate([[0], even_t, even_lam]))
    return tuple(int(v) for v in ts[idx])


@torch.no_grad()
def teacher_trajectory(
    model: LoadedModel, seeds: Sequence[int], teacher_nfe: int | None = None, grid_size: int = 160
) -> TeacherTrajectory:
    """Run the teacher once and keep its states on a `candidate_grid` of `grid_size` points."""
    teacher_ts = teacher_timesteps(model.alphas_cumprod, teacher_nfe)
    grid = candidate_grid(teacher_ts, model.alphas_cumprod, grid_size)
    keep = set(grid)
    x_T, _ = initial_noise(list(seeds), model.sample_shape)
    states = {teacher_ts[0]: x_T.clone()}

    bar = progress(len(teacher_ts), "dp teacher", unit="step")

    def record(info: dict) -> None:
        bar.update()
        if info["t_next"] in keep:
            states[info["t_next"]] = info["x"].clone()

    with bar:
        x0 = run_teacher(model.denoiser, x_T, teacher_ts, model.alphas_cumprod, callback=record)
    return TeacherTrajectory(grid, torch.stack([states[t] for t in grid]), x0)


def progress_iter(items: Sequence, desc: str, unit: str):
    """`items`, ticking a progress bar (`pipeline.io.console`) as they are consumed."""
    with progress(len(items), desc, unit=unit) as bar:
        for item in items:
            yield item
            bar.update()


@torch.no_grad()
def jump_costs(model: LoadedModel, traj: TeacherTrajectory) -> np.ndarray:
    """cost [G, G + 1]: mean per-dimension MSE ([0, 1] scale) of one DDIM jump from grid i to grid j > i
    (column G: to clean) against the teacher; inf where j <= i."""
    return _costs(model, traj, traj)


def _costs(model: LoadedModel, sources: TeacherTrajectory, traj: TeacherTrajectory) -> np.ndarray:
    """Jumps leave from ``sources.states[i]`` (evaluated at grid i) and are compared with `traj`'s states."""
    G = len(traj.grid)
    abar = model.alphas_cumprod
    scale = 1.0 / (model.data_range[1] - model.data_range[0]) ** 2  # MSE on the [0, 1] scale
    targets = torch.cat([traj.states, traj.x0[None]]).double()  # [G + 1, B, ...]
    a_next = [abar[t].item() for t in traj.grid] + [1.0]
    cost = np.full((G, G + 1), np.inf)
    a_all = torch.tensor(a_next, dtype=torch.float64)
    for i, t in enumerate(progress_iter(traj.grid, "dp costs", "row")):
        x = sources.states[i]
        eps = model.denoiser(x, torch.full((x.shape[0],), t, dtype=torch.long)).double()
        x, a_t = x.double(), abar[t].item()
        # Every jump i -> j > i at once: DDIM eta = 0, x_j = sqrt(abar_j) x0_pred + sqrt(1 - abar_j) eps
        # (the same update as `pipeline.solvers.ddim.ddim_step`; a test pins one entry to it).
        x0_pred = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        a_j = a_all[i + 1 :].reshape(-1, *([1] * x.ndim))
        x_j = a_j.sqrt() * x0_pred + (1 - a_j).sqrt() * eps
        cost[i, i + 1 :] = ((x_j - targets[i + 1 :]) ** 2).flatten(1).mean(1).numpy() * scale
    return cost


@torch.no_grad()
def heun_jump_costs(model: LoadedModel, traj: TeacherTrajectory) -> np.ndarray:
    """cost [G, G + 1] of one Heun step (2 model evaluations) from grid i to grid j > i; the step to clean
    (column G) is Euler, as in `pipeline.solvers` (= the DDIM jump). G^2 / 2 extra evaluations: one batched
    denoiser call per source point over every target's predictor state.

    In x~ = x / sqrt(abar), sigma = sqrt((1 - abar) / abar): d_i = eps(x_i, t_i), predictor
    x~'_j = x~_i + (sigma_j - sigma_i) d_i, corrector x~_j = x~_i + (sigma_j - sigma_i) (d_i + eps(x'_j, t_j)) / 2.
    """
    G = len(traj.grid)
    abar = model.alphas_cumprod
    scale = 1.0 / (model.data_range[1] - model.data_range[0]) ** 2
    cost = _costs(model, traj, traj)  # the Euler column G (and a fallback for nothing else)
    a = torch.tensor([abar[t].item() for t in traj.grid], dtype=torch.float64)
    sig = ((1 - a) / a).sqrt()
    B = traj.states.shape[1]
    for i, t in enumerate(progress_iter(traj.grid[:-1], "dp heun costs", "row")):
        x = traj.states[i]
        eps_i = model.denoiser(x, torch.full((B,), t, dtype=torch.long)).double()
        xt_i = x.double() / a[i].sqrt()
        js = torch.arange(i + 1, G)
        shape = (-1, *([1] * x.ndim))
        h = (sig[js] - sig[i]).reshape(shape)
        pred = (xt_i + h * eps_i) * a[js].sqrt().reshape(shape)  # [J, B, ...] VP states at t_j
        t_rows = torch.as_tensor([traj.grid[j] for j in js.tolist()], dtype=torch.long).repeat_interleave(B)
        eps_j = model.denoiser(pred.reshape(-1, *x.shape[1:]).to(x.dtype), t_rows).double().reshape(pred.shape)
        x_j = (xt_i + h * (eps_i + eps_j) / 2) * a[js].sqrt().reshape(shape)
        cost[i, i + 1 : G] = ((x_j - traj.states[i + 1 :].double()) ** 2).flatten(2).mean((1, 2)).numpy() * scale
    return cost


SOLVER_COSTS = {"heun": heun_jump_costs}
"""Solvers whose DP uses their own one-step cost. Every other solver uses the DDIM jump (`jump_costs`): exact
for DDIM and Euler (the same update); for the multistep solvers (DPM-Solver++ 2M/3M, UniPC, iPNDM) it is
their first-order step, the one they take when no history exists, so the DP places steps for first-order
local error and the search that follows corrects for the history terms."""


@torch.no_grad()
def start_costs(model: LoadedModel, traj: TeacherTrajectory) -> np.ndarray:
    """start [G, G + 1]: like `jump_costs`, but every jump leaves from x_T (traj.states[0]) evaluated as if
    it stood at grid point i (row 0 equals jump_costs' row 0)."""
    x_T = traj.states[0]
    shifted = TeacherTrajectory(traj.grid, x_T.expand(len(traj.grid), *x_T.shape), traj.x0)
    return _costs(model, shifted, traj)


def best_path(cost: np.ndarray, n: int, start_cost: np.ndarray | None = None) -> tuple[list[int], float]:
    """Grid indices [n] of the cheapest n-jump path 0 -> ... -> clean (column G), and its total cost.

    With `start_cost` [G, G + 1] the path may start at any grid point i, and its first jump costs
    ``start_cost[i, j]`` instead of ``cost[i, j]``.
    """
    G = cost.shape[0]
    if not 1 <= n <= G:
        raise StridelabError(f"cannot place {n} steps on a grid of {G} points")
    first = cost if start_cost is None else start_cost
    # best[k, j]: cheapest way to stand on grid point j after k jumps from the start.
    best = np.full((n, G), np.inf)
    back = np.zeros((n, G), dtype=np.int64)
    if start_cost is None:
        best[0, 0] = 0.0
    else:
        best[0, :] = 0.0
    for k in range(1, n):
        tot = best[k - 1][:, None] + (first if k == 1 else cost)[:, :G]  # [from, to]
        back[k] = tot.argmin(0)
        best[k] = tot.min(0)
    final = best[n - 1] + (first if n == 1 else cost)[:, G]
    j = int(final.argmin())
    total = float(final[j])
    path = [j]
    for k in range(n - 1, 0, -1):
        j = int(back[k, j])
        path.append(j)
    return path[::-1], total


def dp_schedule(
    model: LoadedModel,
    nfe: int,
    seeds: Sequence[int] = range(64),
    teacher_nfe: int | None = None,
    grid_size: int = 160,
    traj: TeacherTrajectory | None = None,
    free_start: bool = False,
    solver: str = "ddim",
) -> Schedule:
    """The n-step schedule minimising the accumulated one-jump error against the teacher (see module doc).

    Args:
        model: the model (its denoiser is called once per grid point).
        nfe: steps n.
        seeds: seeds of the teacher trajectories (tuning seeds: never the held-out ones).
        teacher_nfe: teacher steps (uniform DDIM), as the evaluator's teacher; default every timestep.
        grid_size: candidate timesteps (about); the schedule is a subset of them.
        traj: a precomputed trajectory (to place several NFEs from one teacher run).
        free_start: let the DP choose the first timestep too (see the module doc); named ``"dp_free"``.
        solver: whose one-step cost the DP sums (`SOLVER_COSTS`; the DDIM jump otherwise).
    Returns:
        Schedule named ``"dp"`` (``"dp_free"``) with ``params`` recording the grid size and the path's cost.
    """
    T = model.num_train_timesteps
    nfe = check_nfe(nfe, T)
    traj = traj if traj is not None else teacher_trajectory(model, seeds, teacher_nfe, grid_size)
    start = start_costs(model, traj) if free_start else None
    cost_of = SOLVER_COSTS.get(solver, jump_costs)
    path, total = best_path(cost_of(model, traj), nfe, start)
    ts = tuple(traj.grid[i] for i in path)
    return Schedule(ts, T, "dp_free" if free_start else "dp",
                    {"grid_size": len(traj.grid), "path_cost": total, "cost": cost_of.__name__})
