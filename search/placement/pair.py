"""An encoder and a decoder searched together for the DDIM round trip (inversion, then reconstruction).

A round trip encodes data x_0 along an increasing list e = (e_0 < ... < e_{n-1}) with DDIM inversion and
decodes the code along a decreasing list d = (d_0 > ... > d_{n-1}); the code must be at the decoder's first
level, so e_{n-1} = d_0. The usual pair is symmetric (e = reversed d, one schedule for both directions).
Inversion's error comes from assuming eps(x_t) ~ eps(x_s) across each encoder step, the decoder's from the
opposite approximation, so the best encoder need not be the decoder reversed.

`pair_search` is compass search (Kolda, Lewis & Torczon 2003) over the 2n - 1 free coordinates: one step
(or the shared top level, which moves both lists) shifted by +-s at a time; it moves to the best improving
move of each batch it evaluates and shrinks s along a ladder (`search.placement.polish.step_ladder`) when
no move at s improves. With `pin_top` the shared top stays put (the sweep's rule for inversion: a pair that
stops below t = T - 1 round-trips more easily without encoding to noise).

Example:
    >>> pair_neighbours((900, 400), (400, 900), 50, 1000)[:3]
    [((850, 400), (400, 850)), ((950, 400), (400, 950)), ((900, 350), (400, 900))]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

Pair = tuple[tuple[int, ...], tuple[int, ...]]
"""(decoder, strictly decreasing; encoder, strictly increasing, ending at the decoder's first step)."""


def is_valid_pair(decoder: Sequence[int], encoder: Sequence[int], num_train_timesteps: int) -> bool:
    d, e = list(decoder), list(encoder)
    return (len(d) > 0 and len(e) > 0 and all(a > b for a, b in zip(d, d[1:])) and all(a < b for a, b in zip(e, e[1:]))
            and min(d[-1], e[0]) >= 0 and max(d[0], e[-1]) < num_train_timesteps and d[0] == e[-1])


def pair_neighbours(decoder: Sequence[int], encoder: Sequence[int], step: int, num_train_timesteps: int,
                    pin_top: bool = False) -> list[Pair]:
    """Valid single moves of +-`step`, in order: the decoder's coordinates (the first moves the encoder's last
    with it), then the encoder's but its last; each down, then up."""
    d0, e0 = tuple(int(v) for v in decoder), tuple(int(v) for v in encoder)
    out: list[Pair] = []
    for which, n in (("d", len(d0)), ("e", len(e0) - 1)):
        for i in range(1 if (which == "d" and pin_top) else 0, n):
            for sgn in (-1, 1):
                d, e = list(d0), list(e0)
                if which == "d":
                    d[i] += sgn * step
                    if i == 0:
                        e[-1] = d[0]
                else:
                    e[i] += sgn * step
                if is_valid_pair(d, e, num_train_timesteps):
                    out.append((tuple(d), tuple(e)))
    return out


@dataclass(frozen=True)
class PairResult:
    """What `pair_search` found.

    Attributes:
        decoder, encoder: the best pair.
        loss: its loss; start_loss: the starting pair's.
        evals: pairs evaluated (the start included).
        history: (evals so far, best loss so far) after each batch, starting with (1, start_loss).
    """

    decoder: tuple[int, ...]
    encoder: tuple[int, ...]
    loss: float
    start_loss: float
    evals: int
    history: tuple[tuple[int, float], ...]


def pair_search(loss: Callable[[list[Pair]], Sequence[float]], decoder: Sequence[int], encoder: Sequence[int], *,
                evals: int, ladder: Sequence[int], num_train_timesteps: int, pin_top: bool = False,
                batch: int = 8) -> PairResult:
    """Compass search from (`decoder`, `encoder`) on `loss` (a list of pairs -> their losses, one batch per call:
    an actor pool evaluates a batch at once), at most `evals` evaluations in all. Deterministic for a
    deterministic `loss`."""
    if not is_valid_pair(decoder, encoder, num_train_timesteps):
        raise ValueError(f"not a round-trip pair: decoder {list(decoder)}, encoder {list(encoder)}")
    best: Pair = (tuple(int(v) for v in decoder), tuple(int(v) for v in encoder))
    best_loss = start = float(loss([best])[0])
    used, tried, history = 1, {best}, [(1, start)]
    for step in ladder:
        moved = True
        while moved and used < evals:
            moved = False
            todo = [c for c in pair_neighbours(*best, step, num_train_timesteps, pin_top) if c not in tried]
            while todo and used < evals and not moved:
                chunk, todo = todo[:min(batch, evals - used)], todo[min(batch, evals - used):]
                vals = [float(v) for v in loss(chunk)]
                used += len(chunk)
                tried.update(chunk)
                i = min(range(len(chunk)), key=vals.__getitem__)
                if vals[i] < best_loss:
                    best, best_loss, moved = chunk[i], vals[i], True
                history.append((used, best_loss))
    return PairResult(best[0], best[1], best_loss, start, used, tuple(history))
