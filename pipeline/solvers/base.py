"""The solver contract: every sampler of the family runs an explicit integer timestep list.

In the spirit of k-diffusion's ``sample_*(model, x, sigmas)``, each solver is one pure function

    ``sample(denoiser, x_T, timesteps, alphas_cumprod, *, eta=0.0, noise_sampler=None) -> x_0``

with the conventions of `pipeline.solvers.ddim`:

- ``denoiser(x: Tensor[B, ...], t: LongTensor[B]) -> eps``: the model is only ever evaluated at listed
  integer timesteps (Heun's corrector at the next listed one), so every solver runs the model exactly as
  it was trained, with no fractional t.
- ``x_T``: VP noise at level abar[timesteps[0]] (the teacher's and DDIM's x_T), shape [B, ...].
- ``timesteps``: strictly decreasing ints in [0, T - 1]; the step after the last goes to clean data
  (abar = 1, sigma = 0), as diffusers' ``final_sigmas_type="zero"``.
- rows never interact (all arithmetic is per element), so a sample does not depend on its batch.
- NFE is counted in model evaluations (`SolverSpec.evaluations`): n for the one-evaluation solvers,
  2n - 1 for Heun (its last step, to sigma = 0, is an Euler step).

`SolverSpec` says how the same solver is configured downstream (diffusers scheduler class and config,
k-diffusion and ComfyUI sampler names), so an exported schedule names exactly what it was tuned for.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


class SampleFn(Protocol):
    def __call__(
        self,
        denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        x_T: torch.Tensor,
        timesteps: Any,
        alphas_cumprod: torch.Tensor,
        *,
        eta: float = 0.0,
        noise_sampler: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class SolverSpec:
    """One solver of the family and its downstream twins.

    Attributes:
        name: the CLI name (``--solver``).
        sample: the implementation (see the module docstring for the contract).
        order: the solver's order of accuracy (1 DDIM/Euler, 2 Heun/2M/UniPC-2, 3 for 3M, ...).
        evals_per_step: model evaluations per step (2 for Heun; its last step takes 1).
        description: one line for tables and help.
        diffusers_class: the diffusers scheduler class a user runs it with, or None.
        diffusers_config: that scheduler's config on top of the model's betas (solver order, algorithm
            type, final-step handling); `pipeline.interop.apply` builds exactly this.
        diffusers_default: how the scheduler spaces ``set_timesteps(n)`` by default (its baseline).
        k_diffusion: the ``k_diffusion.sampling.sample_*`` function with the same update, or None.
        comfyui: the ComfyUI sampler name (KSamplerSelect) for SamplerCustom with a SIGMAS list, or None.
        eta: whether the solver takes eta > 0 (DDIM only).
        multistep: whether a step reuses earlier model outputs (DPM-Solver++ 2M/3M, UniPC, iPNDM).
    """

    name: str
    sample: SampleFn
    order: int
    description: str
    evals_per_step: int = 1
    diffusers_class: str | None = None
    diffusers_config: Mapping[str, Any] = field(default_factory=dict)
    diffusers_default: str = "linspace"
    k_diffusion: str | None = None
    comfyui: str | None = None
    eta: bool = False
    multistep: bool = False

    def evaluations(self, steps: int) -> int:
        """Model evaluations of an n-step run (Heun: 2n - 1, the final step to sigma = 0 is Euler)."""
        return self.evals_per_step * steps - (self.evals_per_step - 1) if steps > 0 else 0

    def steps_for_budget(self, nfe: int) -> int:
        """The most steps whose evaluations fit in `nfe` (Heun: (nfe + 1) // 2); at least 1."""
        return max(1, (nfe + self.evals_per_step - 1) // self.evals_per_step)

    def record(self) -> dict[str, Any]:
        """What an export stores about the solver: enough to configure the same one anywhere."""
        return {
            "name": self.name,
            "order": self.order,
            "evals_per_step": self.evals_per_step,
            "diffusers_class": self.diffusers_class,
            "diffusers_config": dict(self.diffusers_config),
            "k_diffusion": self.k_diffusion,
            "comfyui": self.comfyui,
        }
