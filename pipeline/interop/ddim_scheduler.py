"""`StrideDDIMScheduler`: a diffusers scheduler that runs DDIM on any explicit timestep list.

diffusers' own ``DDIMScheduler`` takes no ``timesteps=`` and its ``step`` derives the next timestep as
``t - T // N``, so a learned, non-uniform schedule is silently mis-stepped. This scheduler has the same config
keys, ``from_config`` / ``save_config`` round trip, ``step`` signature and output, with two differences:

- ``set_timesteps(timesteps=[...])`` accepts any strictly decreasing list (checked by
  `pipeline.core.schedules.validate_timesteps`), so pipelines that pass ``timesteps=`` through diffusers'
  ``retrieve_timesteps`` work; and the config key ``schedule_timesteps`` can hold the list, so a pipeline
  that only calls ``set_timesteps(num_inference_steps)`` runs it too.
- ``step`` goes from ``timesteps[i]`` to ``timesteps[i + 1]``, the next *listed* timestep, and from the
  last one to abar = 1 (``set_alpha_to_one=True``) or abar_0.

What keeps the schedule (tests/test_interop.py checks each):

- ``DDPMPipeline(unet, scheduler=stride)``, its ``save_pretrained`` and ``DDPMPipeline.from_pretrained``: the
  schedule is in ``scheduler/scheduler_config.json`` and runs after the reload. ``DDPMPipeline`` is the
  pipeline for this scheduler.
- ``DDIMPipeline`` does **not**: its ``__init__`` replaces any scheduler by
  ``DDIMScheduler.from_config(scheduler.config)``, so ``DDIMPipeline(unet, stride)`` and
  ``DDIMPipeline.from_pretrained(dir)`` run diffusers' uniform steps. diffusers only logs that it dropped
  ``schedule_timesteps``; once a stride scheduler holding a schedule exists, that log line also raises a
  ``UserWarning`` (`ScheduleDroppedWarning`; any other class built from such a config, too).
  Assigning ``pipe.scheduler = stride`` after construction, or
  `pipeline.interop.pipelines.sample_with_schedule`, works in any pipeline.

A per-step model time shift (config ``model_log_sigma_shift``, from a schedule's meta; see
`pipeline.core.schedules.MODEL_SHIFT_KEY`): step i still integrates from ``schedule_timesteps[i]``'s level, but
``self.timesteps`` (what a pipeline feeds the network) holds the fractional timesteps of log sigma_i + shift_i,
and ``step`` finds its place by that value. diffusers UNets embed a float timestep, so any pipeline that calls
``unet(x, t)`` and ``scheduler.step(out, t, x)`` with the scheduler's own ``t`` runs it unchanged.

The update itself is `pipeline.solvers.ddim.ddim_step` and the v / x0 -> eps conversion is
`pipeline.models.denoisers.eps_from_prediction`, so this scheduler and `pipeline.solvers.ddim.ddim_sample` cannot
drift apart. ``step`` runs both in float64 (float32 on devices without it) and casts the results to the
sample's dtype: at abar ~ 2.4e-9 (cosine betas, t = 999) x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) divides
by 4.9e-5, and in the sample's own precision the v -> eps -> x0 round trip lost 6e-4 (float32) and ~100%
(float16) of x0. Notation as in `pipeline.solvers.ddim`.

Example::

    from pipeline.interop.ddim_scheduler import StrideDDIMScheduler
    from pipeline.core.schedules import Schedule

    schedule = Schedule.load("schedule.json")
    pipe.scheduler = StrideDDIMScheduler.from_schedule(schedule, pipe.scheduler.config, clip_sample=False)
    images = pipe(num_inference_steps=schedule.nfe).images
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from pipeline.solvers.ddim import ddim_sigma, ddim_step
from pipeline.models.denoisers import PREDICTION_TYPES, eps_from_prediction
from pipeline.errors import StridelabError
from pipeline.core.noise import BETA_SCHEDULES, as_alphas_cumprod, make_betas, model_levels
from pipeline.core.schedules import MODEL_SHIFT_KEY, Schedule, linspace, trailing, uniform, validate_timesteps

TIMESTEP_SPACINGS: tuple[str, ...] = ("leading", "linspace", "trailing")
"""``set_timesteps(num_inference_steps)`` without a stored schedule: diffusers' spacings (bit-equal)."""

_SPACING_FNS = {"leading": uniform, "linspace": linspace, "trailing": trailing}


def choose_timesteps(owner: str, key: str, what: str, stored: Sequence[int] | None, num_inference_steps: int | None,
                     timesteps: Sequence[int] | None, num_train_timesteps: int,
                     spaced: Callable[[int], Sequence[int]], increasing: bool = False) -> tuple[int, ...]:
    """The list a drop-in scheduler's `set_timesteps` walks: `timesteps` when given, else the config's
    stored list (`key`; `num_inference_steps` must then be its length or None), else `spaced(n)`.

    Raises:
        StridelabError: both or neither given, a bad list, or a step count that is not the stored one.
    """
    if timesteps is not None and num_inference_steps is not None:
        raise StridelabError("pass either num_inference_steps or timesteps to set_timesteps, not both")
    if timesteps is not None:
        return validate_timesteps(timesteps, num_train_timesteps, increasing=increasing)
    if stored is not None:
        if num_inference_steps is not None and int(num_inference_steps) != len(stored):
            raise StridelabError(
                f"this {owner} holds a {len(stored)}-step {what} (config {key}); "
                f"call with num_inference_steps={len(stored)}, or pass timesteps=[...]"
            )
        return validate_timesteps(stored, num_train_timesteps, increasing=increasing)
    if num_inference_steps is None:
        raise StridelabError(f"set_timesteps needs num_inference_steps or timesteps (or a stored {key})")
    return tuple(spaced(int(num_inference_steps)))


def scheduler_timesteps(owner: str, what: str, listed: Sequence[int] | None, ts: Sequence[int],
                        shift: Sequence[float] | None, abar: torch.Tensor, device: str | torch.device | None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(``self.timesteps``, the levels the network is told or None) of a scheduler about to run `ts`: the integers
    themselves, or with a model time `shift` (per step of its `listed` steps, which `ts` must then be) the
    fractional labels of log sigma_i + shift_i, float32 as the network gets them (step() matches the pipeline's
    t against these exact values). The one policy of both directions' schedulers."""
    if shift is None:
        return torch.tensor(list(ts), dtype=torch.int64, device=device), None
    if tuple(ts) != tuple(listed):
        raise StridelabError(
            f"this {owner} holds a model time shift for its {what} {list(listed)}; set_timesteps(timesteps={list(ts)}) "
            "would run other steps: call set_timesteps() or build a scheduler without model_log_sigma_shift")
    t_model, model_abar = shifted_model_levels(ts, shift, abar)
    return t_model.to(torch.float32).to(device), model_abar


def shifted_index(timesteps: torch.Tensor, timestep: int | float | torch.Tensor) -> int:
    """The index of `timestep` among a shifted scheduler's fractional labels (float32 as the network got them, so
    matched within 1e-3); raises StridelabError naming them when it is not one."""
    t = float(timestep.item() if isinstance(timestep, torch.Tensor) else timestep)
    hits = (timesteps.cpu().double() - t).abs() <= 1e-3
    if not bool(hits.any()):
        raise StridelabError(f"timestep {t} is not one of this scheduler's (shifted) timesteps "
                             f"{[round(v, 3) for v in timesteps.tolist()]}")
    return int(hits.nonzero()[0, 0])


def shifted_model_levels(timesteps: Sequence[int], shift: Sequence[float],
                         alphas_cumprod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fractional timesteps [n], their abar [n]), float64, that the network is asked at when integer steps
    `timesteps` carry the per-step model time shift `shift` (log sigma; `pipeline.core.noise.model_levels`,
    the rule the shift was learned under)."""
    ac = as_alphas_cumprod(alphas_cumprod)
    abar = ac[torch.as_tensor([int(t) for t in timesteps], dtype=torch.long)]
    return model_levels(abar, torch.as_tensor([float(v) for v in shift], dtype=torch.float64), ac)


def timestep_index(timesteps: torch.Tensor | None, timestep: int | torch.Tensor, owner: str) -> int:
    """Position of `timestep` in a drop-in scheduler's `timesteps` (None: `set_timesteps` not called yet).

    Raises:
        StridelabError: not set yet, a fractional timestep, or one that is not listed.
    """
    if timesteps is None:
        raise StridelabError("call set_timesteps before step")
    t = timestep.item() if isinstance(timestep, torch.Tensor) else timestep
    if float(t) != int(t):
        raise StridelabError(f"timestep {t} is not an integer; {owner} runs integer timesteps")
    hits = (timesteps == int(t)).nonzero()
    if hits.numel() == 0:
        raise StridelabError(f"timestep {int(t)} is not one of this scheduler's timesteps {timesteps.tolist()}")
    return int(hits[0, 0])


class StrideDDIMScheduler(SchedulerMixin, ConfigMixin):
    """DDIM (Song et al. 2021) over an explicit, arbitrary timestep list, as a diffusers scheduler.

    Args:
        num_train_timesteps: T of the model.
        beta_start, beta_end, beta_schedule: the training noise schedule (``linear``, ``scaled_linear``,
            ``squaredcos_cap_v2``), built exactly as diffusers does.
        trained_betas: explicit betas (length T), overriding the above.
        prediction_type: what the model outputs: ``epsilon``, ``v_prediction`` or ``sample``.
        set_alpha_to_one: the step after the last listed timestep goes to abar = 1 (clean data; what
            stridelab's schedules are tuned for); False goes to abar_0 as diffusers' DDIM then does.
        steps_offset: added to ``leading`` spacing (diffusers' meaning).
        timestep_spacing: ``leading``, ``linspace`` or ``trailing``; used only by
            ``set_timesteps(num_inference_steps)`` when no ``schedule_timesteps`` is stored.
        schedule_timesteps: a strictly decreasing list this scheduler runs whenever
            ``set_timesteps(len(schedule_timesteps))`` or ``set_timesteps()`` is called.
        model_log_sigma_shift: per-step model time shift for ``schedule_timesteps`` (one float per step, log
            sigma; see the module docstring), or None.
        clip_sample, thresholding, rescale_betas_zero_snr: accepted so that ``from_config`` of a DDIM/DDPM
            config is explicit about them; only False is supported (stridelab's DDIM, on which schedules
            are tuned, neither clips nor thresholds x0, and needs abar_{T-1} > 0).
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
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
        schedule_timesteps: Sequence[int] | None = None,
        model_log_sigma_shift: Sequence[float] | None = None,
        clip_sample: bool = False,
        thresholding: bool = False,
        rescale_betas_zero_snr: bool = False,
    ):
        flags = {"clip_sample": clip_sample, "thresholding": thresholding, "rescale_betas_zero_snr": rescale_betas_zero_snr}
        for flag, on in flags.items():
            if on:
                raise StridelabError(
                    f"StrideDDIMScheduler does not support {flag}=True (stridelab's DDIM, on which schedules are "
                    f"tuned, does not clip, threshold or zero the terminal SNR); pass {flag}=False, e.g. "
                    f"StrideDDIMScheduler.from_config(config, {flag}=False)"
                )
        if prediction_type not in PREDICTION_TYPES:
            raise StridelabError(
                f"unknown prediction_type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}"
            )
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise StridelabError(
                f"unknown timestep_spacing {timestep_spacing!r}; choose one of {', '.join(TIMESTEP_SPACINGS)}"
            )
        T = int(num_train_timesteps)
        if trained_betas is not None:
            betas = torch.tensor(list(trained_betas), dtype=torch.float32)
            if betas.numel() != T:
                raise StridelabError(f"trained_betas has {betas.numel()} values but num_train_timesteps is {T}")
        elif beta_schedule in BETA_SCHEDULES:
            betas = make_betas(beta_schedule, T, beta_start, beta_end)
        else:
            raise StridelabError(f"unknown beta_schedule {beta_schedule!r}; choose one of {', '.join(BETA_SCHEDULES)}")
        self.betas = betas
        self.alphas = 1.0 - betas
        # The cumulative product in float32, as diffusers and the checkpoint's training did; widened for the math.
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self._abar = as_alphas_cumprod(self.alphas_cumprod)
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else float(self._abar[0])
        if schedule_timesteps is not None:
            ts = validate_timesteps(list(schedule_timesteps), T)
            self.register_to_config(schedule_timesteps=list(ts))  # JSON-shaped, so configs compare equal
        self._shift: tuple[float, ...] | None = None
        if model_log_sigma_shift is not None:
            if schedule_timesteps is None:
                raise StridelabError("model_log_sigma_shift needs schedule_timesteps: the shift is per step of that list")
            # the one validation rule of a shift (pipeline.core.schedules.Schedule)
            shift = Schedule(list(schedule_timesteps), T, meta={MODEL_SHIFT_KEY: list(model_log_sigma_shift)}).model_shift
            self.register_to_config(model_log_sigma_shift=list(model_log_sigma_shift))
            self._shift = shift
        if schedule_timesteps is not None:
            _warn_when_a_schedule_is_dropped()
        self.num_inference_steps: int | None = None
        self._steps: torch.Tensor | None = None
        self._model_abar: torch.Tensor | None = None
        # Before set_timesteps: every training timestep, high to low, as diffusers' schedulers hold.
        self.timesteps = torch.from_numpy(np.arange(T)[::-1].copy())

    # ---------------------------------------------------------------------------------------------- helpers
    @classmethod
    def from_schedule(
        cls, schedule: Schedule, config: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> "StrideDDIMScheduler":
        """A scheduler that runs `schedule`: ``from_config(config, schedule_timesteps=schedule.timesteps)``, with
        its model time shift (`Schedule.model_shift`) when it has one.

        Refuses a schedule made for another T, or (when ``schedule.meta`` has ``alphas_cumprod_sha256``)
        for another noise schedule (see `pipeline.interop.apply.check_compatible`).
        """
        from pipeline.interop.apply import check_compatible

        shift = schedule.model_shift
        sched = cls.from_config(dict(config or {}), schedule_timesteps=list(schedule.timesteps),
                                model_log_sigma_shift=None if shift is None else list(shift), **kwargs)
        check_compatible(schedule, sched.alphas_cumprod, what="StrideDDIMScheduler")
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
        """Set the timesteps to run.

        Args:
            num_inference_steps: with ``schedule_timesteps`` in the config it must equal its length (or be
                None); without, the config's ``timestep_spacing`` places that many steps.
            device: where ``self.timesteps`` lives.
            timesteps: any strictly decreasing list of ints in [0, T-1] (custom schedule).
        Raises:
            StridelabError: both or neither given, a bad list, or a step count that is not the stored one.
        """
        def spaced(n: int) -> tuple[int, ...]:
            fn = _SPACING_FNS[self.config.timestep_spacing]
            extra = {"steps_offset": self.config.steps_offset} if self.config.timestep_spacing == "leading" else {}
            return fn(n, self._abar, **extra).timesteps

        ts = choose_timesteps(type(self).__name__, "schedule_timesteps", "schedule", self.config.schedule_timesteps,
                              num_inference_steps, timesteps, self.config.num_train_timesteps, spaced)
        self.num_inference_steps = len(ts)
        self._steps = torch.tensor(ts, dtype=torch.int64)  # where each step integrates from
        self.timesteps, self._model_abar = scheduler_timesteps(type(self).__name__, "schedule",
                                                               self.config.schedule_timesteps, ts, self._shift,
                                                               self._abar, device)

    def _index(self, timestep: int | torch.Tensor) -> int:
        if self._model_abar is not None and self.num_inference_steps is not None:
            return shifted_index(self.timesteps, timestep)
        return timestep_index(self.timesteps if self.num_inference_steps is not None else None, timestep,
                              type(self).__name__)

    def previous_timestep(self, timestep: int | torch.Tensor) -> int:
        """The timestep the step from `timestep` lands on: the next listed one (of ``schedule_timesteps``, also with
        a model time shift), or -1 (the final jump)."""
        i = self._index(timestep)
        return int(self._steps[i + 1]) if i + 1 < len(self._steps) else -1

    # ---------------------------------------------------------------------------------------------- step
    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DDIMSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One DDIM update from `timestep` to the next listed timestep (`pipeline.solvers.ddim.ddim_step`).

        Args:
            model_output: the network's output at (sample, timestep): eps, v or x0 per ``prediction_type``.
            timestep: one of ``self.timesteps``.
            sample: x_t, shape [B, ...].
            eta: 0 deterministic DDIM, 1 DDPM posterior.
            use_clipped_model_output: accepted for ``DDIMPipeline``; no effect (x0 is never clipped here).
            generator: draws the noise for eta > 0 (as diffusers' DDIM does, shaped like model_output).
            variance_noise: the noise itself, instead of `generator`.
            return_dict: return a ``DDIMSchedulerOutput`` rather than a tuple.
        Returns:
            ``(prev_sample, pred_original_sample)`` = (x_s, x0_pred).
        """
        if not 0.0 <= eta <= 1.0:
            raise StridelabError(f"eta must be in [0, 1], got {eta}")
        i = self._index(timestep)
        steps = self._steps
        a_cur = float(self._abar[int(steps[i])])
        a_next = float(self._abar[int(steps[i + 1])]) if i + 1 < len(steps) else self.final_alpha_cumprod
        wide = _wide_dtype(sample.device)  # see the module docstring: x0 divides by sqrt(abar)
        x = sample.to(wide)
        # the level the network was told it sees (shifted or not) turns its v / x0 output into eps
        a_model = a_cur if self._model_abar is None else float(self._model_abar[i])
        abar_batch = torch.full((sample.shape[0],), a_model, dtype=wide, device=sample.device)
        eps = eps_from_prediction(model_output.to(wide), x, abar_batch, self.config.prediction_type)
        noise = None
        if eta > 0 and ddim_sigma(a_cur, a_next, eta) > 0:
            if variance_noise is not None and generator is not None:
                raise StridelabError("pass either generator or variance_noise to step, not both")
            noise = variance_noise if variance_noise is not None else randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
            )
            noise = noise.to(wide)
        prev_sample, x0_pred = ddim_step(x, eps, a_cur, a_next, eta=eta, noise=noise)
        prev_sample, x0_pred = prev_sample.to(sample.dtype), x0_pred.to(sample.dtype)
        if not return_dict:
            return prev_sample, x0_pred
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0_pred)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, per sample (training / img2img)."""
        abar = self._abar.to(original_samples.device)[timesteps.to(original_samples.device).long()]
        abar = abar.reshape(-1, *([1] * (original_samples.ndim - 1))).to(original_samples.dtype)
        return abar.sqrt() * original_samples + (1 - abar).sqrt() * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 per sample (Salimans & Ho 2022; v-prediction training
        targets), with `sample` = x0 and `noise` = eps, shapes [B, ...], `timesteps` [B]."""
        abar = self._abar.to(sample.device)[timesteps.to(sample.device).long()]
        abar = abar.reshape(-1, *([1] * (sample.ndim - 1))).to(sample.dtype)
        return abar.sqrt() * noise - (1 - abar).sqrt() * sample


def _wide_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device has it (MPS has not: float32 there)."""
    return torch.float32 if device.type == "mps" else torch.float64


class ScheduleDroppedWarning(UserWarning):
    """A scheduler was built from a `StrideDDIMScheduler` config and dropped its learned schedule."""


class _DroppedScheduleFilter(logging.Filter):
    """Turns diffusers' log line "The config attributes {'schedule_timesteps': ...} were passed to X, but are
    not expected and will be ignored" (``ConfigMixin.extract_init_dict``) into a `ScheduleDroppedWarning`."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        dropped = "'schedule_timesteps'" in msg and "'schedule_timesteps': None" not in msg
        if dropped and "were passed to" in msg and "not expected" in msg:
            cls = msg.split("were passed to ", 1)[1].split(",", 1)[0]
            warnings.warn(
                f"{cls} was built from a StrideDDIMScheduler config and dropped its learned schedule "
                f"(schedule_timesteps): it runs {cls}'s own spacing. DDIMPipeline does this to any scheduler in "
                "__init__ (and from_pretrained); use DDPMPipeline, assign pipe.scheduler after construction, or "
                "pipeline.interop.sample_with_schedule",
                ScheduleDroppedWarning, stacklevel=2,
            )
        return True


def _warn_when_a_schedule_is_dropped() -> None:
    """Install `_DroppedScheduleFilter` on diffusers' config logger, once (when the first stride scheduler with a
    schedule is made: only then can a config drop one)."""
    log = logging.getLogger("diffusers.configuration_utils")
    if not any(isinstance(f, _DroppedScheduleFilter) for f in log.filters):
        log.addFilter(_DroppedScheduleFilter())
