"""DP step placement: the path search is optimal, the costs are DDIM jumps, and the result beats uniform."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pipeline.solvers.ddim import ddim_step
from pipeline.evaluation.inprocess import InProcessEvaluator
from pipeline.models.load import load_model
from pipeline.core.schedules import make_schedule
from search.placement.dp import best_path, dp_schedule, jump_costs, start_costs, teacher_trajectory


@pytest.fixture(scope="module")
def ring8():
    return load_model("gmm:ring8")


@pytest.fixture(scope="module")
def traj(ring8):
    return teacher_trajectory(ring8, range(32), teacher_nfe=250, grid_size=80)


def test_best_path_is_optimal_by_brute_force():
    rng = np.random.default_rng(0)
    G = 7
    cost = np.triu(rng.random((G, G + 1)), k=1)
    cost[np.tril_indices(G, 0, G + 1)] = np.inf
    for n in range(1, G + 1):
        path, total = best_path(cost, n)
        brute = min(
            sum(cost[a, b] for a, b in zip((0, *mid), (*mid, G)))
            for mid in itertools.combinations(range(1, G), n - 1)
        )
        assert path[0] == 0 and len(path) == n and all(a < b for a, b in zip(path, path[1:]))
        assert total == pytest.approx(brute)


def test_free_start_path_is_optimal_by_brute_force():
    rng = np.random.default_rng(1)
    G = 7
    cost, start = (np.triu(rng.random((G, G + 1)), k=1) for _ in range(2))
    for c in (cost, start):
        c[np.tril_indices(G, 0, G + 1)] = np.inf
    for n in range(1, G + 1):
        path, total = best_path(cost, n, start)
        brute = min(
            start[nodes[0], (*nodes[1:], G)[0]] + sum(cost[a, b] for a, b in zip(nodes[1:], (*nodes[2:], G)))
            for nodes in itertools.combinations(range(G), n)
        )
        assert len(path) == n and all(a < b for a, b in zip(path, path[1:]))
        assert total == pytest.approx(brute)


def test_free_start_costs_leave_from_x_T(ring8, traj):
    cost, start = jump_costs(ring8, traj), start_costs(ring8, traj)
    np.testing.assert_array_equal(start[0], cost[0])  # grid 0 is where x_T lives
    assert not np.allclose(start[5, 6:], cost[5, 6:])  # elsewhere x_T is not the teacher's state
    fixed, free = dp_schedule(ring8, 10, traj=traj), dp_schedule(ring8, 10, traj=traj, free_start=True)
    assert free.name == "dp_free" and free.nfe == 10
    assert free.params["path_cost"] <= fixed.params["path_cost"]  # a superset of paths


def test_trajectory_starts_at_x_T_and_ends_at_the_teacher(ring8, traj):
    ev = InProcessEvaluator(ring8, range(32), teacher_nfe=250)
    assert traj.grid[0] == 996 and list(traj.grid) == sorted(traj.grid, reverse=True)
    torch.testing.assert_close(traj.states[0], ev.teacher.x_T)
    torch.testing.assert_close(traj.x0, ev.teacher.x0)


def test_cost_entries_are_one_ddim_jump(ring8, traj):
    cost = jump_costs(ring8, traj)
    abar = ring8.alphas_cumprod
    i, j = 3, 20
    x = traj.states[i]
    eps = ring8.denoiser(x, torch.full((x.shape[0],), traj.grid[i])).double()
    x_j, _ = ddim_step(x.double(), eps, abar[traj.grid[i]].item(), abar[traj.grid[j]].item())
    want = ((x_j - traj.states[j].double()) ** 2).mean().item() / 4  # [-1, 1] -> [0, 1] scale
    assert cost[i, j] == pytest.approx(want, rel=1e-9)
    assert np.isinf(cost[5, 5]) and np.isinf(cost[5, 2])
    assert np.isfinite(cost[0, -1])  # straight to clean


def test_dp_beats_uniform_on_ring8_nfe10(ring8, traj):
    sched = dp_schedule(ring8, 10, traj=traj)
    assert sched.nfe == 10 and sched.name == "dp" and sched.timesteps[0] == 996
    ev = InProcessEvaluator(ring8, range(5000, 5064), teacher_nfe=250)  # other seeds than the DP's
    dp_r, uni_r = ev.evaluate([sched, make_schedule("uniform", 10, ring8.alphas_cumprod)])
    assert dp_r.recon.mean() < 0.5 * uni_r.recon.mean()
