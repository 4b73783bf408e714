"""`StrideDDIMInverseScheduler`: diffusers' ``DDIMInverseScheduler`` over any explicit increasing list.

Editing pipelines (DDIM inversion, then regenerate from the recovered noise) use diffusers'
``DDIMInverseScheduler``, whose ``step`` derives the level it comes from as ``t - T // N``: like
``DDIMScheduler`` it assumes even spacing. This scheduler walks an explicit, strictly increasing list
instead, the reverse of a stridelab schedule (`Schedule.encode_timesteps`) or an encoder list of its own,
and is saved and loaded with its list (config key ``inverse_timesteps``), as `StrideDDIMScheduler` is
with ``schedule_timesteps``.

The loop it serves, as in diffusers' inversion pipelines::

    inverse = StrideDDIMInverseScheduler.from_schedule(schedule, pipe.scheduler.config, clip_sample=False)
    inverse.set_timesteps()
    for t in inverse.timesteps:          # increasing
        x = inverse.step(unet(x, t).sample, t, x).prev_sample
    # x is the code at level abar[timesteps[-1]]; decode it with StrideDDIMScheduler.from_schedule(schedule)

Conventions, and how they map onto diffusers' (``scheduling_ddim_inverse.py``, 0.42):

- ``step(model_output, t, x)`` goes from the level of the *previous listed* timestep to abar_t; the first
  listed step comes from abar = 1 (``set_alpha_to_one=True``, clean data) or abar_0. diffusers comes
  from ``t - T // N`` (``initial_alpha_cumprod`` where that is negative). On ``leading`` spacing (any
  ``steps_offset``) and on ``trailing`` spacing where N divides T the two are the same level, and
  ``step`` equals diffusers' (tests/test_inverse_scheduler.py); on ``trailing`` with T % N != 0
  diffusers steps from a level next to the listed one, this scheduler from the listed one.
- ``set_timesteps(n)`` without a stored list places the config's ``timestep_spacing`` (``leading``,
  ``linspace`` or ``trailing``, as the forward scheduler does) in increasing order: diffusers' leading and
  trailing lists exactly.
- The model is called at the label t the step goes to (``unet(x, t)``, what the pipelines do), and a v or
  x0 output is converted to eps at that label's abar_t, as the model read it and as
  `pipeline.models.denoisers.DiffusersDenoiser` converts for `pipeline.solvers.ddim.ddim_invert`.
  diffusers converts with the level the step comes from. For eps models (what inversion pipelines run)
  the two agree; for v / x0 models this scheduler equals ``ddim_invert`` and diffusers' does not (and
  an x0 model's first step from abar = 1 divides by zero there).

The update is `pipeline.solvers.ddim.ddim_step` with eta = 0, and every check of the config (betas,
prediction type, spacing, the unsupported clip / threshold / zero-SNR flags) is the forward scheduler's,
so the two directions cannot drift apart. Notation as in `pipeline.solvers.ddim`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from pipeline.core.schedules import INVERSE_MODEL_SHIFT_KEY, Schedule, validate_timesteps
from pipeline.errors import StridelabError
from pipeline.interop.ddim_scheduler import (StrideDDIMScheduler, choose_timesteps, scheduler_timesteps, shifted_index,
                                             timestep_index)
from pipeline.models.denoisers import eps_from_prediction
from pipeline.solvers.ddim import ddim_step


class StrideDDIMInverseScheduler(SchedulerMixin, ConfigMixin):
    """DDIM inversion (eta = 0) over an explicit, arbitrary increasing timestep list, as a diffusers scheduler.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, prediction_type, steps_offset,
        timestep_spacing, clip_sample, thresholding, rescale_betas_zero_snr: as `StrideDDIMScheduler`
            (and checked by it: only False is supported for the three flags).
        set_alpha_to_one: the first step comes from abar = 1 (clean data, what ``ddim_invert`` and
            stridelab's schedules assume); False from abar_0, as diffusers' ``initial_alpha_cumprod``.
        inverse_timesteps: a strictly increasing list this scheduler walks whenever
            ``set_timesteps(len(inverse_timesteps))`` or ``set_timesteps()`` is called.
        model_log_sigma_shift: the encoder's per-step model time shift for ``inverse_timesteps`` (one float per
            step, log sigma; `pipeline.core.schedules.INVERSE_MODEL_SHIFT_KEY`): ``self.timesteps`` then holds the
            fractional labels the network is called with (log sigma_i + shift_i), while step i still lands at
            ``inverse_timesteps[i]``'s level, as `StrideDDIMScheduler` runs a decoder's shift.
    """

    _compatibles = ["DDIMInverseScheduler"]
    order = 1
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | None = None,
        prediction_type: str = "epsilon",
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        timestep_spacing: str = "leading",
        inverse_timesteps: Sequence[int] | None = None,
        model_log_sigma_shift: Sequence[float] | None = None,
        clip_sample: bool = False,
        thresholding: bool = False,
        rescale_betas_zero_snr: bool = False,
    ):
        # The forward scheduler owns the config policy and the abar table; its messages name the class called.
        try:
            self._forward = StrideDDIMScheduler(
                num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                beta_schedule=beta_schedule, trained_betas=trained_betas, prediction_type=prediction_type,
                set_alpha_to_one=set_alpha_to_one, steps_offset=steps_offset, timestep_spacing=timestep_spacing,
                clip_sample=clip_sample, thresholding=thresholding, rescale_betas_zero_snr=rescale_betas_zero_snr,
            )
        except StridelabError as e:
            raise StridelabError(str(e).replace("StrideDDIMScheduler", type(self).__name__)) from None
        self.betas, self.alphas, self.alphas_cumprod = self._forward.betas, self._forward.alphas, self._forward.alphas_cumprod
        self._abar = self._forward._abar
        # diffusers' name: the level the first step comes from (the forward's final level, the same value).
        self.initial_alpha_cumprod = self._forward.final_alpha_cumprod
        if inverse_timesteps is not None:
            ts = validate_timesteps(list(inverse_timesteps), int(num_train_timesteps), increasing=True)
            self.register_to_config(inverse_timesteps=list(ts))  # JSON-shaped, so configs compare equal
        self._shift: tuple[float, ...] | None = None
        if model_log_sigma_shift is not None:
            if inverse_timesteps is None:
                raise StridelabError("model_log_sigma_shift needs inverse_timesteps: the shift is per step of that list")
            # the one validation rule of an encoder's shift (pipeline.core.schedules.Schedule)
            ts = list(self.config.inverse_timesteps)
            self._shift = Schedule(ts[::-1], int(num_train_timesteps),
                                   meta={INVERSE_MODEL_SHIFT_KEY: list(model_log_sigma_shift)}).inverse_model_shift
            self.register_to_config(model_log_sigma_shift=[float(v) for v in model_log_sigma_shift])
        self.num_inference_steps: int | None = None
        self.timesteps: torch.Tensor | None = None
        self._steps: torch.Tensor | None = None  # where each step lands (the listed integers)
        self._model_abar: torch.Tensor | None = None  # the levels the network is told, with a shift

    @classmethod
    def from_schedule(
        cls, schedule: Schedule, config: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> "StrideDDIMInverseScheduler":
        """The encoder of `schedule`: ``from_config(config, inverse_timesteps=schedule.encode_timesteps)``, with its
        encoder's model time shift (`Schedule.inverse_model_shift`) when it has one.

        Refuses a schedule made for another T or noise schedule, as `StrideDDIMScheduler.from_schedule` does.
        """
        from pipeline.interop.apply import check_compatible

        shift = schedule.inverse_model_shift
        sched = cls.from_config(dict(config or {}), inverse_timesteps=list(schedule.encode_timesteps),
                                model_log_sigma_shift=None if shift is None else list(shift), **kwargs)
        check_compatible(schedule, sched.alphas_cumprod, what=cls.__name__)
        return sched

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def scale_model_input(self, sample: torch.Tensor, timestep: int | torch.Tensor | None = None) -> torch.Tensor:
        """DDIM needs no input scaling; returns `sample` unchanged."""
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[int] | None = None,
    ) -> None:
        """Set the increasing timesteps to walk.

        Args:
            num_inference_steps: with ``inverse_timesteps`` in the config it must equal its length (or be
                None); without, the config's ``timestep_spacing`` places that many steps.
            device: where ``self.timesteps`` lives.
            timesteps: any strictly increasing list of ints in [0, T-1].
        Raises:
            StridelabError: both or neither given, a bad list, or a step count that is not the stored one.
        """
        def spaced(n: int) -> tuple[int, ...]:
            self._forward.set_timesteps(n)  # the forward spacing, walked backwards
            return tuple(self._forward.timesteps.flip(0).tolist())

        ts = choose_timesteps(type(self).__name__, "inverse_timesteps", "list", self.config.inverse_timesteps,
                              num_inference_steps, timesteps, self.config.num_train_timesteps, spaced, increasing=True)
        self.num_inference_steps = len(ts)
        self._steps = torch.tensor(ts, dtype=torch.int64)
        self.timesteps, self._model_abar = scheduler_timesteps(type(self).__name__, "list", self.config.inverse_timesteps,
                                                               ts, self._shift, self._abar, device)

    def _index(self, timestep: int | torch.Tensor) -> int:
        if self._model_abar is not None:
            return shifted_index(self.timesteps, timestep)
        return timestep_index(self.timesteps, timestep, type(self).__name__)

    def previous_timestep(self, timestep: int | torch.Tensor) -> int:
        """The timestep whose level the step to `timestep` comes from: the listed one before, or -1 (the start)."""
        i = self._index(timestep)
        return int(self._steps[i - 1]) if i > 0 else -1

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> DDIMSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One inverse DDIM update onto `timestep`'s level, from the previous listed one's (`ddim_step`, eta 0).

        Args:
            model_output: the network's output at (sample, timestep): eps, v or x0 per ``prediction_type``.
            timestep: one of ``self.timesteps``, the label the model was called with (and, without a shift, the
                level reached).
            sample: x at the previous listed level (clean data before the first step), shape [B, ...].
            return_dict: return a ``DDIMSchedulerOutput`` rather than a tuple.
        Returns:
            ``(prev_sample, pred_original_sample)``: x at abar_t (diffusers' name for the output) and x0_pred.
        """
        i = self._index(timestep)
        t_to = int(self._steps[i])
        a_from = float(self._abar[int(self._steps[i - 1])]) if i > 0 else float(self.initial_alpha_cumprod)
        a_to = float(self._abar[t_to])
        # the level the network was told it sees (shifted or not) turns its v / x0 output into eps
        a_model = a_to if self._model_abar is None else float(self._model_abar[i])
        abar_batch = torch.full((sample.shape[0],), a_model, dtype=torch.float64, device=sample.device)
        eps = eps_from_prediction(model_output, sample, abar_batch, self.config.prediction_type).to(sample.dtype)
        x_to, x0_pred = ddim_step(sample, eps, a_from, a_to, eta=0.0)
        if not return_dict:
            return x_to, x0_pred
        return DDIMSchedulerOutput(prev_sample=x_to, pred_original_sample=x0_pred)
