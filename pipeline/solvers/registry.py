"""The solver family by name: `SOLVERS`, `get_solver`, `solve`.

=================  ======================================  =====  ======================================
name               what it is                              order  downstream twin (diffusers)
=================  ======================================  =====  ======================================
``ddim``           DDIM (eta; the core, teacher, inverter) 1      `StrideDDIMScheduler` (ours)
=================  ======================================  =====  ======================================
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from pipeline.errors import StridelabError
from pipeline.solvers.base import SolverSpec
from pipeline.solvers.ddim import ddim_sample, noise_sampler_from


def _ddim(denoiser, x_T, timesteps, alphas_cumprod, *, eta=0.0, noise_sampler=None):
    return ddim_sample(denoiser, x_T, timesteps, alphas_cumprod, eta=eta, noise_sampler=noise_sampler)


SOLVERS: dict[str, SolverSpec] = {
    "ddim": SolverSpec(
        "ddim", _ddim, 1, "DDIM (eta = 0 deterministic; the core, the teacher and the inversion)",
        diffusers_class="StrideDDIMScheduler", diffusers_default="leading", k_diffusion="sample_euler",
        comfyui="ddim", eta=True,
    ),
}
"""Every solver by CLI name."""

SOLVER_NAMES: tuple[str, ...] = tuple(SOLVERS)
DEFAULT_SOLVER = "ddim"


def get_solver(name: str) -> SolverSpec:
    """The registry entry for `name`; a one-line error listing the names otherwise."""
    spec = SOLVERS.get(name)
    if spec is None:
        raise StridelabError(f"must be one of {', '.join(SOLVERS)}, got {name!r}", param="solver")
    return spec


@torch.no_grad()
def solve(
    name: str,
    denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_T: torch.Tensor,
    timesteps: Sequence[int],
    alphas_cumprod: torch.Tensor,
    *,
    eta: float = 0.0,
    noise_sampler: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Run solver `name` over `timesteps` from x_T [B, ...]; returns x_0 (see `pipeline.solvers.base`).

    `generator` (one, or one per sample) or `noise_sampler` give the per-step noise when eta > 0.
    """
    spec = get_solver(name)
    if eta and not spec.eta:
        raise StridelabError(f"> 0 needs the ddim solver ({name} is deterministic)", param="eta")
    if eta and noise_sampler is None:
        noise_sampler = noise_sampler_from(generator, x_T)
    return spec.sample(denoiser, x_T, timesteps, alphas_cumprod, eta=eta, noise_sampler=noise_sampler)


def tuned_for(meta: Mapping[str, Any]) -> str | None:
    """The solver a schedule was tuned for, from its ``meta["solver"]`` record (None: not recorded)."""
    rec = meta.get("solver")
    return rec.get("name") if isinstance(rec, Mapping) else None


def warn_if_tuned_for_other(meta: Mapping[str, Any], solver: str, *, stacklevel: int = 2) -> None:
    """One warning when a schedule tuned for one solver is run by another (its steps may suit that one only:
    a DDIM-tuned schedule made DPM-Solver++ 2M 1.95x worse on bundled:digits at NFE 10)."""
    other = tuned_for(meta)
    if other is not None and other != solver:
        warnings.warn(f"this schedule was tuned for solver {other!r}, running it with {solver!r}: "
                      f"learn one for {solver!r} (stridelab sweep --solver {solver}) for its best steps",
                      stacklevel=stacklevel + 1)
