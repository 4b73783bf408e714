"""Train the bundled DDPM on the 8x8 digits (``pipeline.models.digits``): a small, seeded, CPU-sized loop.

The model is a diffusers ``UNet2DModel`` predicting eps (Ho et al., 2020, Eq. 14 "L_simple") under the
linear beta schedule with T = 1000 (``bundled:digits``); ``TrainConfig.beta_schedule`` and
``prediction_type`` also give the cosine-beta (``squaredcos_cap_v2``), v-predicting ``bundled:digits-v``
(Salimans & Ho 2022: target v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0). Weights are tracked with an exponential moving average (EMA) and
the EMA weights are what ``save_ddpm`` writes.

Notation (as in ``pipeline.solvers.ddim``):

==================  ===========================================
``alphas_cumprod``  abar_t
``x0``              a clean image in [-1, 1]
``x_t``             sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps
``eps``             standard normal noise, the regression target (eps prediction)
``v``               sqrt(abar_t) * eps - sqrt(1 - abar_t) * x0, the target under v prediction
==================  ===========================================

Learning rate: linear warm-up, then cosine decay over *progress*, where progress is the larger of
``step / steps`` and ``elapsed / max_minutes``. The run therefore anneals and stops on time even when the
CPU is slower than planned; with ``max_minutes=None`` the run is a pure function of the config.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch

from pipeline.errors import StridelabError
from pipeline.io import console
from pipeline.models.bundled import DIGITS_DDPM_DIR, DIGITS_V_DDPM_DIR, atomic_directory
from pipeline.models.digits import SPLITS, load_digits_images

log = logging.getLogger(__name__)

DEFAULT_DDPM_DIR = DIGITS_DDPM_DIR
DEFAULT_DDPM_V_DIR = DIGITS_V_DDPM_DIR
NUM_TRAIN_TIMESTEPS = 1000
TRAIN_BETA_SCHEDULES: tuple[str, ...] = ("linear", "squaredcos_cap_v2")
TRAIN_PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class TrainConfig:
    """Configuration of one DDPM training run (saved into TRAINING.json).

    Args:
        seed: seeds the weight init, batch order, noise and timesteps.
        steps: optimiser steps (upper bound; ``max_minutes`` may stop earlier).
        batch_size: images per step.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear learning-rate warm-up.
        ema_decay: EMA decay; the effective decay is ``min(ema_decay, (1 + k) / (10 + k))`` at step k.
        grad_clip: max global gradient norm.
        block_out_channels: UNet widths per resolution (8x8, 4x4, 2x2, ...).
        attention_levels: how many of the lowest resolutions use attention blocks.
        layers_per_block: ResNet layers per UNet block.
        norm_num_groups: GroupNorm groups (must divide every width).
        split: which digits split to train on.
        max_minutes: wall-clock budget; ``None`` for no limit.
        log_every: steps between loss log lines.
        beta_schedule: diffusers beta schedule of the noise process: ``linear`` (1e-4 .. 0.02) or
            ``squaredcos_cap_v2`` (cosine, Nichol & Dhariwal 2021).
        prediction_type: what the UNet regresses: ``epsilon`` or ``v_prediction``.
        num_threads: torch CPU threads (not part of the run's identity).
    """

    seed: int = 0
    steps: int = 3600
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    attention_levels: int = 1
    layers_per_block: int = 2
    norm_num_groups: int = 32
    split: Literal["all", "train", "test"] = "all"
    max_minutes: float | None = 22.0
    log_every: int = 100
    num_threads: int | None = field(default=None, compare=False)
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        if self.beta_schedule not in TRAIN_BETA_SCHEDULES:
            raise StridelabError(
                f"unknown beta_schedule {self.beta_schedule!r}; choose one of {', '.join(TRAIN_BETA_SCHEDULES)}"
            )
        if self.prediction_type not in TRAIN_PREDICTION_TYPES:
            raise StridelabError(
                f"unknown prediction_type {self.prediction_type!r}; choose one of {', '.join(TRAIN_PREDICTION_TYPES)}"
            )
        for name in ("steps", "batch_size", "layers_per_block", "norm_num_groups", "log_every"):
            if getattr(self, name) < 1:
                raise StridelabError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise StridelabError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not self.lr > 0:
            raise StridelabError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise StridelabError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not self.block_out_channels:
            raise StridelabError("block_out_channels must not be empty")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise StridelabError(f"block_out_channels {bad} not divisible by norm_num_groups={self.norm_num_groups}")
        if 2 ** (len(self.block_out_channels) - 1) > 8:
            raise StridelabError(f"too many levels for 8x8 images: {self.block_out_channels}")
        if not 0 <= self.attention_levels <= len(self.block_out_channels):
            raise StridelabError(f"attention_levels must be in [0, {len(self.block_out_channels)}], got {self.attention_levels}")
        if self.split not in SPLITS:
            raise StridelabError(f"unknown split {self.split!r}; allowed: {', '.join(SPLITS)}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise StridelabError(f"max_minutes must be > 0 or None, got {self.max_minutes}")
        # JSON round trips give lists; keep the frozen config hashable.
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))


def make_scheduler(beta_schedule: str = "linear", prediction_type: str = "epsilon"):
    """The DDPM noise schedule of a bundled model, T = 1000; the defaults (linear betas, eps prediction)
    are ``bundled:digits``'. The saved scheduler config records both arguments, and the loader reads them."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        clip_sample=False,
    )


def make_unet(cfg: TrainConfig):
    """A fresh ``UNet2DModel`` for 1-channel 8x8 images, attention at the lowest ``attention_levels``."""
    from diffusers import UNet2DModel

    n = len(cfg.block_out_channels)
    down = tuple("AttnDownBlock2D" if i >= n - cfg.attention_levels else "DownBlock2D" for i in range(n))
    up = tuple("AttnUpBlock2D" if b == "AttnDownBlock2D" else "UpBlock2D" for b in reversed(down))
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=cfg.block_out_channels,
        down_block_types=down,
        up_block_types=up,
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups,
    )


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (buffers copied)."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def lr_factor(progress: float, step: int, warmup_steps: int) -> float:
    """Linear warm-up times cosine decay to 0 over progress in [0, 1]."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    return warm * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class EpochBatches:
    """Batches of ``batch_size`` images drawn without replacement; reshuffled once an epoch is used up."""

    def __init__(self, data: torch.Tensor, batch_size: int, gen: torch.Generator):
        self.data, self.batch_size, self.gen = data, batch_size, gen
        self.perm = torch.randperm(data.shape[0], generator=gen)
        self.cursor = 0

    def next(self) -> torch.Tensor:
        n = self.data.shape[0]
        if self.cursor + self.batch_size > n:
            self.perm = torch.randperm(n, generator=self.gen)
            self.cursor = 0
        x0 = self.data[self.perm[self.cursor : self.cursor + self.batch_size]]
        self.cursor += self.batch_size
        return x0


def simple_loss(
    unet, x0: torch.Tensor, abar: torch.Tensor, gen: torch.Generator, prediction_type: str = "epsilon"
) -> torch.Tensor:
    """L_simple (Ho et al. 2020, eq. 14) at x_t ~ q(x_t | x0), t uniform: MSE to eps, or under
    ``v_prediction`` to v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022). The random
    draws (t, then eps) are the same for both targets."""
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (x0.shape[0],), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    a = abar[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1.0 - a).sqrt() * eps
    if prediction_type == "epsilon":
        target = eps
    elif prediction_type == "v_prediction":
        target = a.sqrt() * eps - (1.0 - a).sqrt() * x0
    else:
        raise StridelabError(f"unknown prediction_type {prediction_type!r}; choose one of {', '.join(TRAIN_PREDICTION_TYPES)}")
    return torch.nn.functional.mse_loss(unet(x_t, t).sample, target)


def training_progress(step: int, steps: int, elapsed_s: float, budget_s: float | None) -> float:
    """How far through the run we are, in [0, 1): by steps, or by wall clock when that is further along
    (the LR schedule then anneals to the time budget)."""
    progress = step / steps
    return progress if budget_s is None else max(progress, elapsed_s / budget_s)


def optimizer_step(unet, ema, opt: torch.optim.Optimizer, loss: torch.Tensor, cfg: TrainConfig, step: int) -> None:
    """Backward, clip, AdamW step, then the EMA (its decay warms up so early weights fade fast)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
    opt.step()
    ema_update(ema, unet, min(cfg.ema_decay, (1.0 + step) / (10.0 + step)))


def train_ddpm(cfg: TrainConfig, *, progress_bar: bool = True) -> tuple[Any, dict[str, Any]]:
    """Train a DDPM on the digits (MSE to eps or v, per ``cfg.prediction_type``) and return ``(ema_unet, history)``.

    Args:
        cfg: the run configuration.
        progress_bar: show a progress bar with ETA on stderr (`pipeline.io.console`: terminal only).

    Returns:
        The EMA ``UNet2DModel`` (eval mode, on CPU) and a history dict with ``loss`` (per step),
        ``loss_ema`` (EMA-smoothed loss, final value), ``steps`` done, ``wall_s``, ``stopped_by``,
        ``params`` and ``raw_unet`` (the last non-EMA weights, kept for checks; not what is saved).
    """
    # Set-up: seeds, data, noise schedule, model, its EMA copy, optimiser.
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = load_digits_images(cfg.split)
    abar = make_scheduler(cfg.beta_schedule, cfg.prediction_type).alphas_cumprod.to(torch.float32)
    unet = make_unet(cfg)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    log.info("training %d-param UNet on %d %s digits", count_params(unet), data.shape[0], cfg.split)

    # The loop: stop at cfg.steps or at the wall-clock budget, whichever comes first.
    budget_s = None if cfg.max_minutes is None else cfg.max_minutes * 60.0
    losses: list[float] = []
    loss_smooth = float("nan")
    batches = EpochBatches(data, cfg.batch_size, gen)
    stopped_by = "steps"
    t_start = time.monotonic()
    bar = console.progress(cfg.steps, "training", unit="step", enabled=progress_bar, mininterval=2.0)
    unet.train()
    for step in range(cfg.steps):
        elapsed = time.monotonic() - t_start
        if budget_s is not None and elapsed >= budget_s:
            stopped_by = "max_minutes"
            break
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(training_progress(step, cfg.steps, elapsed, budget_s), step,
                                             cfg.warmup_steps)
        loss = simple_loss(unet, batches.next(), abar, gen, cfg.prediction_type)
        optimizer_step(unet, ema, opt, loss, cfg, step)

        # Logging: the per-step loss, and a smoothed one for the bar and the log.
        value = float(loss.detach())
        losses.append(value)
        loss_smooth = value if math.isnan(loss_smooth) else 0.99 * loss_smooth + 0.01 * value
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss_smooth:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
        bar.update()
        if (step + 1) % cfg.log_every == 0:
            log.info("step %d loss %.4f (smoothed) %.1f s", step + 1, loss_smooth, time.monotonic() - t_start)
    bar.close()

    history = {
        "loss": losses,
        "loss_ema": loss_smooth,
        "steps": len(losses),
        "wall_s": time.monotonic() - t_start,
        "stopped_by": stopped_by,
        "params": count_params(ema),
        "raw_unet": unet.eval(),
    }
    return ema, history


def save_ddpm(
    unet,
    out_dir: str | os.PathLike,
    training_info: dict[str, Any] | None = None,
    *,
    beta_schedule: str = "linear",
    prediction_type: str = "epsilon",
) -> Path:
    """Write ``DDPMPipeline(unet, make_scheduler(beta_schedule, prediction_type))`` as safetensors to
    ``out_dir`` atomically.

    The pipeline is saved into a temporary directory beside ``out_dir`` and renamed into place, so a
    reader never sees a half-written model. ``training_info`` (if given) goes to ``TRAINING.json``.
    Pass the run's ``beta_schedule`` and ``prediction_type`` (the scheduler config is how the loader
    learns them).
    """
    from diffusers import DDPMPipeline

    scheduler = make_scheduler(beta_schedule, prediction_type)
    with atomic_directory(out_dir) as tmp:
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
        if training_info is not None:
            (tmp / "TRAINING.json").write_text(json.dumps(training_info, indent=2, sort_keys=True) + "\n")
    return Path(out_dir).resolve()


def training_record(cfg: TrainConfig, history: dict[str, Any], command: str) -> dict[str, Any]:
    """The TRAINING.json content for one finished run."""
    return {
        "command": command,
        "config": asdict(cfg),
        "steps": history["steps"],
        "stopped_by": history["stopped_by"],
        "wall_time_s": round(history["wall_s"], 1),
        "final_loss_smoothed": round(history["loss_ema"], 5),
        "loss_smoothing": "exponential moving average of the per-step loss, weight 0.01",
        "params": history["params"],
        "weights": "EMA",
        "torch_version": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
