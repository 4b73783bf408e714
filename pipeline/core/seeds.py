"""Per-sample randomness: sample i depends on seed i alone, never on batching, actor or device.

Each sample owns a CPU `torch.Generator` seeded with its own seed (the idea of EDM's
`StackedRandomGenerator`). Noise is always drawn on the CPU and then moved, because CUDA and CPU
generators give different streams for the same seed: drawing on the CPU makes a sample identical on a
laptop and on any GPU actor. The cost is one small host-to-device copy per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def make_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per seed, in order."""
    gens = []
    for s in seeds:
        g = torch.Generator(device="cpu")
        g.manual_seed(int(s))
        gens.append(g)
    return gens


def randn_per_sample(
    generators: Sequence[torch.Generator] | torch.Generator,
    shape: Sequence[int],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise, shape [B, *shape].

    Args:
        generators: one generator per sample (B = len), or a single generator shared by the batch
            (then B = shape[0] and `shape` includes the batch dimension).
        shape: per-sample shape (list of generators) or full shape (single generator).
    """
    if isinstance(generators, torch.Generator):
        return torch.randn(tuple(shape), generator=generators, dtype=torch.float32).to(device, dtype)
    draws = [torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in generators]
    return torch.stack(draws).to(device, dtype)


def initial_noise(
    seeds: Sequence[int],
    shape: Sequence[int],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, list[torch.Generator]]:
    """x_T for each seed, shape [B, *shape], and the generators (to keep drawing per-step noise from)."""
    gens = make_generators(seeds)
    return randn_per_sample(gens, shape, device=device, dtype=dtype), gens
