"""The solver family by name: `SOLVERS`, `get_solver`, `solve`.

=================  ==========================================  =====  =========================================
name               what it is (module)                         order  downstream twin (diffusers; k / comfy)
=================  ==========================================  =====  =========================================
``ddim``           DDIM, eta (`ddim`; core, teacher, inverter)  1      `StrideDDIMScheduler` (ours); euler / ddim
``euler``          Euler on the PF-ODE in sigma (`singlestep`)  1      ``EulerDiscreteScheduler``, ``sigmas=``;
                                                                      sample_euler / euler
``heun``           Heun, 2n - 1 evaluations (`singlestep`)     2      ``HeunDiscreteScheduler``, ``timesteps=``;
                                                                      sample_heun / heun
``dpmsolver++2m``  DPM-Solver++(2M), midpoint (`dpmsolver`)    2      ``DPMSolverMultistepScheduler``,
                                                                      ``timesteps=``; sample_dpmpp_2m / dpmpp_2m
``dpmsolver++3m``  DPM-Solver++(3M) (`dpmsolver`)              3 (*)  the same class, ``solver_order=3``; none
``unipc``          UniPC-bh2, UniP-2 + UniC (`unipc`)          2      ``UniPCMultistepScheduler`` (no VP list
                                                                      argument: `pipeline.evaluation.twins`);
                                                                      uni_pc_bh2 (unverified)
``ipndm``          iPNDM, AB orders 1-4 on eps (`ipndm`)       4 (*)  none in diffusers; ipndm (from the formula)
=================  ==========================================  =====  =========================================

(*) nominal. Measured on Gaussian data with lambda-uniform steps (tests/test_solver_family.py): 3M is second
order as diffusers writes it (its D2 weight is half the Taylor term's), iPNDM second order (fixed coefficients
on a non-uniform sigma grid; ~3.7 on a sigma-uniform one), UniPC third (the corrector adds one).

Why ours runs inside trials: at equal outputs, NFE 10, bundled:digits, 256 seeds, our functions take
0.97-1.06x the wall time of the diffusers scheduler loops (the network dominates) and 0.16-0.21x of the
loops' own per-step cost with a free denoiser, with no scheduler state to rebuild per trial
(benchmarks/bench_solvers.py, 2-core CPU, 2026-12-02).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from pipeline.errors import StridelabError
from pipeline.solvers.base import SolverSpec
from pipeline.solvers.ddim import ddim_sample, noise_sampler_from
from pipeline.solvers.dpmsolver import dpmpp_2m_sample, dpmpp_3m_sample
from pipeline.solvers.ipndm import ipndm_sample
from pipeline.solvers.singlestep import euler_sample, heun_sample
from pipeline.solvers.unipc import unipc_sample


def _ddim(denoiser, x_T, timesteps, alphas_cumprod, *, eta=0.0, noise_sampler=None):
    return ddim_sample(denoiser, x_T, timesteps, alphas_cumprod, eta=eta, noise_sampler=noise_sampler)


_DPMPP = {"algorithm_type": "dpmsolver++", "solver_type": "midpoint", "final_sigmas_type": "zero",
          "lower_order_final": True}
"""The DPMSolverMultistepScheduler config both DPM-Solver++ entries share (plus ``solver_order``)."""

SOLVERS: dict[str, SolverSpec] = {
    "ddim": SolverSpec(
        "ddim", _ddim, 1, "DDIM (eta = 0 deterministic; the core, the teacher and the inversion)",
        diffusers_class="StrideDDIMScheduler", diffusers_default="leading", k_diffusion="sample_euler",
        comfyui="ddim", eta=True,
    ),
    "euler": SolverSpec(
        "euler", euler_sample, 1, "Euler on the probability-flow ODE in sigma (= DDIM eta 0 up to rounding)",
        diffusers_class="EulerDiscreteScheduler", diffusers_config={"final_sigmas_type": "zero"},
        k_diffusion="sample_euler", comfyui="euler",
    ),
    "heun": SolverSpec(
        "heun", heun_sample, 2, "Heun on the PF-ODE in sigma (2 evaluations a step, the last step Euler)",
        evals_per_step=2, diffusers_class="HeunDiscreteScheduler", k_diffusion="sample_heun", comfyui="heun",
    ),
    "dpmsolver++2m": SolverSpec(
        "dpmsolver++2m", dpmpp_2m_sample, 2, "DPM-Solver++(2M), data prediction, midpoint",
        diffusers_class="DPMSolverMultistepScheduler", diffusers_config=_DPMPP | {"solver_order": 2},
        k_diffusion="sample_dpmpp_2m", comfyui="dpmpp_2m", multistep=True,
    ),
    "dpmsolver++3m": SolverSpec(
        "dpmsolver++3m", dpmpp_3m_sample, 3, "DPM-Solver++(3M), data prediction (2nd order next to last if n < 15)",
        diffusers_class="DPMSolverMultistepScheduler", diffusers_config=_DPMPP | {"solver_order": 3},
        multistep=True,
    ),
    "unipc": SolverSpec(
        "unipc", unipc_sample, 2, "UniPC-bh2: UniP-2 predictor, UniC corrector on every step (no extra NFE)",
        diffusers_class="UniPCMultistepScheduler", diffusers_config={
            "solver_order": 2, "solver_type": "bh2", "predict_x0": True, "lower_order_final": True,
            "final_sigmas_type": "zero", "disable_corrector": []},
        comfyui="uni_pc_bh2", multistep=True,
    ),
    "ipndm": SolverSpec(
        "ipndm", ipndm_sample, 4, "iPNDM: Adams-Bashforth (orders 1-4) on eps in (x / sqrt(abar), sigma)",
        comfyui="ipndm", multistep=True,
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
