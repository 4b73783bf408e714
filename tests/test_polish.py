"""Compass search on the integer timestep grid (search.placement.polish) and the `steps` space."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

from pipeline.core.noise import make_alphas_cumprod
from pipeline.core.schedules import make_schedule
from search.placement.polish import neighbours, next_candidates, step_ladder
from search.space import make_space

T = 1000
LADDER = step_ladder(T)


def test_step_ladder_halves_down_to_the_finest():
    assert step_ladder(1000) == (40, 20, 10, 5)
    assert step_ladder(1000, finest=1) == (40, 20, 10, 5, 2, 1)
    assert step_ladder(50) == (2, 1) and step_ladder(10) == (1,)


def test_neighbours_are_valid_single_moves():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 12))
        ts = tuple(int(v) for v in np.sort(rng.choice(T, size=n, replace=False))[::-1])
        step = int(rng.choice([1, 5, 40, 300]))
        for c in neighbours(ts, step, T):
            assert all(a > b for a, b in zip(c, c[1:])) and 0 <= c[-1] and c[0] <= T - 1
            diff = [abs(a - b) for a, b in zip(c, ts) if a != b]
            assert diff == [step]
    # the ends and the neighbours' positions bound the moves
    assert neighbours((999, 998, 0), 1, T) == [(999, 997, 0), (999, 998, 1)]


def test_candidates_take_the_incumbents_step_then_halve():
    inc = (900, 500, 100)
    rng = np.random.default_rng(0)
    first = next_candidates(inc, 40, set(), 3, T, LADDER, rng)
    assert [s for _, s in first] == [40, 40, 40] and [c for c, _ in first] == neighbours(inc, 40, T)[:3]
    # all moves of size 40 tried: the next batch moves by 20
    tried = set(neighbours(inc, 40, T))
    nxt = next_candidates(inc, 40, tried, 4, T, LADDER, rng)
    assert {s for _, s in nxt} == {20} and not tried & {c for c, _ in nxt}
    # an incumbent found at step 10 never goes back to 40
    assert {s for _, s in next_candidates(inc, 10, set(), 6, T, LADDER, rng)} == {10}


def test_converged_search_makes_valid_untried_random_moves():
    inc = (900, 500, 100)
    tried = {c for s in LADDER for c in neighbours(inc, s, T)} | {inc}
    out = next_candidates(inc, 5, tried, 5, T, LADDER, np.random.default_rng(1))
    assert len(out) == 5 and len({c for c, _ in out}) == 5
    for c, s in out:
        assert c not in tried and s == LADDER[-1]
        assert all(a > b for a, b in zip(c, c[1:])) and 0 <= c[-1] <= c[0] <= T - 1
        assert max(abs(a - b) for a, b in zip(c, inc)) <= 2 * LADDER[-1]


def test_steps_space_round_trip():
    abar = make_alphas_cumprod()
    space = make_space("steps", 10, abar)
    for name in ("uniform", "karras", "quadratic"):
        sched = make_schedule(name, 10, abar)
        params = space.params_of(sched)
        assert space.suggest(optuna.trial.FixedTrial(params)).timesteps == sched.timesteps
    # a sampler that breaks the order still gets a valid, distinct schedule
    out = space.build({f"t{i:02d}": v for i, v in enumerate([5, 5, 5, 900, 0, 1, 2, 3, 4, 6])})
    assert list(out.timesteps) == sorted(set(out.timesteps), reverse=True) and out.nfe == 10
    with pytest.raises(Exception, match="nfe"):
        space.params_of(make_schedule("uniform", 5, abar))


def test_pattern_move_repeats_the_last_improving_move_first():
    inc, rng = (900, 500, 100), np.random.default_rng(0)
    out = next_candidates(inc, 20, set(), 3, T, LADDER, rng, last_move=(0, -20, 0))
    assert out[0] == ((900, 480, 100), 20) and [c for c, _ in out[1:]] == neighbours(inc, 20, T)[:2]
    # an invalid or already tried pattern move is skipped
    assert next_candidates(inc, 20, {(900, 480, 100)}, 1, T, LADDER, rng, last_move=(0, -20, 0))[0][0] == (880, 500, 100)
    assert next_candidates((999, 500, 0), 20, set(), 1, T, LADDER, rng, last_move=(20, 0, 0))[0][0] == (979, 500, 0)


@pytest.mark.parametrize("k", [0, 1, 2, 7])
def test_never_more_than_k_candidates(k):
    inc, rng = (900, 500, 100), np.random.default_rng(0)
    assert len(next_candidates(inc, 20, set(), k, T, LADDER, rng, last_move=(0, -20, 0))) == k
    tried = {c for s in LADDER for c in neighbours(inc, s, T)}
    assert len(next_candidates(inc, 5, tried, k, T, LADDER, rng, last_move=(0, -5, 0))) == k
