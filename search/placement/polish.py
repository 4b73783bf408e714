"""Local refinement of the best schedule on the integer timestep grid (compass / pattern search).

The global phase of a sweep (TPE, GP, CMA-ES, ... over a few-parameter warp) finds a good basin fast but
cannot express every placement; moving single steps from the best schedule found so far can. With
n steps and a step size s, the neighbours of the incumbent t = (t_0 > ... > t_{n-1}) are

    t with t_i -> t_i - s   and   t with t_i -> t_i + s,   i = 0..n-1,

kept when they stay strictly decreasing inside [0, T - 1]. Compass search (Kolda, Lewis & Torczon 2003,
"Optimization by direct search") evaluates the incumbent's neighbours at its step size, moves to any that
improves (keeping the step size), and halves the step once every neighbour at that size has been tried
without success. It converges to a point no single-step move improves at the finest step.

Everything here is a pure function of the study history (which schedules were tried, which is best, at
which step size it was found), so a resumed sweep carries on exactly where it stopped.

Example:
    >>> step_ladder(1000)
    (40, 20, 10, 5)
    >>> neighbours((900, 500, 0), 40, 1000)
    [(860, 500, 0), (940, 500, 0), (900, 460, 0), (900, 540, 0), (900, 500, 40)]
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

Timesteps = tuple[int, ...]


def step_ladder(num_train_timesteps: int, finest: int | None = None) -> tuple[int, ...]:
    """Step sizes from T/25 halving down to `finest` (default T/200, at least 1): 40, 20, 10, 5 for T = 1000.

    Why stop at T/200: below it, single-step moves change a 10-step recon error by less than its
    standard error on a few hundred seeds, so finer steps fit the tuning seeds, not the model.
    """
    T = int(num_train_timesteps)
    finest = max(1, T // 200) if finest is None else max(1, int(finest))
    out: list[int] = []
    s = max(T // 25, finest)
    while s >= finest:
        if not out or s < out[-1]:
            out.append(s)
        if s == finest:
            break
        s = max(s // 2, finest)
    return tuple(out)


def neighbours(timesteps: Sequence[int], step: int, num_train_timesteps: int) -> list[Timesteps]:
    """Valid single-coordinate moves of +-`step` (order: coordinate 0 down, up, coordinate 1 down, ...)."""
    t = [int(v) for v in timesteps]
    out: list[Timesteps] = []
    for i in range(len(t)):
        for d in (-step, step):
            c = list(t)
            c[i] += d
            lo_ok = c[i] >= 0 and (i == len(t) - 1 or c[i] > c[i + 1])
            hi_ok = c[i] <= num_train_timesteps - 1 and (i == 0 or c[i] < c[i - 1])
            if lo_ok and hi_ok:
                out.append(tuple(c))
    return out


def next_candidates(
    incumbent: Sequence[int],
    incumbent_step: int,
    tried: Collection[Timesteps],
    k: int,
    num_train_timesteps: int,
    ladder: Sequence[int],
    rng: np.random.Generator,
    last_move: Sequence[int] | None = None,
    pinned_top: int | None = None,
) -> list[tuple[Timesteps, int]]:
    """Up to `k` untried schedules to evaluate next, each with the step size that produced it.

    First the pattern move (Hooke & Jeeves 1961): the move that produced the incumbent (`last_move`,
    incumbent minus its parent), repeated, since an improving direction often keeps improving. Then the
    untried neighbours at the incumbent's step size, then at each smaller size on the ladder.
    When no single move is left (converged at the finest step), random moves of 2-3 steps by up to twice
    the finest step size: cheap restarts that let the search leave a point single moves cannot improve.
    With `pinned_top` (the inversion objectives: every schedule starts there) no candidate moves the first step.
    """
    tried = set(tried)
    if pinned_top is not None:  # an unmovable first step is, to the search, already tried elsewhere
        tried = _Pinned(tried, int(pinned_top))
    out: list[tuple[Timesteps, int]] = []
    if last_move is not None and any(last_move) and k > 0:
        c = tuple(int(a) + int(d) for a, d in zip(incumbent, last_move))
        if (c[0] <= num_train_timesteps - 1 and c[-1] >= 0 and all(a > b for a, b in zip(c, c[1:]))
                and c not in tried):
            tried.add(c)
            out.append((c, incumbent_step))
    for s in [s for s in ladder if s <= incumbent_step] or [ladder[-1]]:
        for c in neighbours(incumbent, s, num_train_timesteps):
            if c not in tried:
                tried.add(c)
                out.append((c, s))
                if len(out) >= k:
                    return out[:k]
    finest, n = ladder[-1], len(incumbent)
    for _ in range(200 * k):
        if len(out) >= k:
            break
        c = np.array(incumbent, dtype=np.int64)
        idx = rng.choice(n, size=min(n, int(rng.integers(2, 4))), replace=False)
        c[idx] += rng.integers(-2 * finest, 2 * finest + 1, size=idx.size)
        cand = tuple(int(v) for v in c)
        if (c[0] <= num_train_timesteps - 1 and c[-1] >= 0 and np.all(np.diff(c) < 0)
                and cand not in tried):
            tried.add(cand)
            out.append((cand, finest))
    return out[:k]


class _Pinned(set):
    """A tried-set that also counts as tried every schedule whose first step is not `top`."""

    def __init__(self, tried: Collection[Timesteps], top: int):
        super().__init__(tried)
        self.top = top

    def __contains__(self, c: object) -> bool:
        return (isinstance(c, tuple) and len(c) > 0 and c[0] != self.top) or super().__contains__(c)
