"""`StrideDDIMScheduler` against float64 truth at the worst noise level, the diffusers scheduler API it
lacked (`get_velocity`, `timesteps` before `set_timesteps`), and the DDIMPipeline trap made loud."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline

from tiny import tiny_unet

from pipeline.core.schedules import Schedule
from pipeline.errors import StridelabError
from pipeline.interop.apply import apply_schedule
from pipeline.interop.ddim_scheduler import ScheduleDroppedWarning, StrideDDIMScheduler

BETAS = {"linear": {}, "squaredcos_cap_v2": {}}
BOUND = {torch.float32: 2e-7, torch.float16: 1e-3, torch.bfloat16: 8e-3}
"""Max error / max |truth|: one rounding to the dtype (half an ulp: 6e-8, 4.9e-4, 3.9e-3) and a margin."""


def _truth(pred: str, out: torch.Tensor, x: torch.Tensor, a: float, a_next: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, x_next) in float64 straight from the prediction (DDIM eq. 12, eta = 0), no eps round trip."""
    out, x = out.double(), x.double()
    if pred == "epsilon":
        eps, x0 = out, (x - (1 - a) ** 0.5 * out) / a**0.5
    elif pred == "v_prediction":
        eps, x0 = a**0.5 * out + (1 - a) ** 0.5 * x, a**0.5 * x - (1 - a) ** 0.5 * out
    else:
        eps, x0 = (x - a**0.5 * out) / (1 - a) ** 0.5, out
    return x0, a_next**0.5 * x0 + (1 - a_next) ** 0.5 * eps


@pytest.mark.parametrize("dtype", list(BOUND), ids=str)
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("betas", list(BETAS))
def test_first_step_at_t999_is_float64_truth_rounded_once(betas, pred, dtype):
    """t = 999 (cosine: abar 2.4e-9, x0 divides by 4.9e-5): x0 and x_next are the float64 truth from the same
    (rounded) inputs, rounded once to the dtype. Stepping in the sample's dtype lost 6e-4 of x0 in float32
    and ~100% in float16 with cosine betas."""
    sched = StrideDDIMScheduler(beta_schedule=betas, prediction_type=pred)
    sched.set_timesteps(timesteps=[999, 500])
    a, a_next = float(sched._abar[999]), float(sched._abar[500])
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64).clamp(-1, 1)
    eps = torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64)
    x = a**0.5 * x0 + (1 - a) ** 0.5 * eps
    out = {"epsilon": eps, "v_prediction": a**0.5 * eps - (1 - a) ** 0.5 * x0, "sample": x0}[pred]
    x, out = x.to(dtype), out.to(dtype)
    got = sched.step(out, 999, x)
    want_x0, want_next = _truth(pred, out, x, a, a_next)
    assert got.prev_sample.dtype == got.pred_original_sample.dtype == dtype
    for have, want in ((got.pred_original_sample, want_x0), (got.prev_sample, want_next)):
        rel = ((have.double() - want).abs().max() / want.abs().max()).item()
        assert rel <= BOUND[dtype], (rel, BOUND[dtype])


def test_get_velocity_and_timesteps_before_set_timesteps_are_diffusers():
    cfg = {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction", "clip_sample": False}
    ours, theirs = StrideDDIMScheduler(**cfg), DDIMScheduler(**cfg)
    assert torch.equal(ours.timesteps, theirs.timesteps) and ours.timesteps[0] == 999 and len(ours.timesteps) == 1000
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(ours.get_velocity(x0, eps, t), theirs.get_velocity(x0, eps, t), atol=1e-6, rtol=0)
    with pytest.raises(StridelabError, match="set_timesteps"):
        ours.step(eps, 999, x0)


def test_the_suggested_command_for_a_clipping_ddim_config_works():
    """google/ddpm-* configs clip x0: `from_config` alone refuses them naming the fix, and the command that
    `apply_schedule` suggests for a DDIMScheduler runs as printed."""
    scheduler = DDIMScheduler(clip_sample=True, thresholding=False)
    with pytest.raises(StridelabError, match="clip_sample=False"):
        StrideDDIMScheduler.from_config(scheduler.config)
    with pytest.raises(StridelabError) as e:
        apply_schedule(scheduler, Schedule((900, 300, 20), 1000, "s"))
    command = re.search(r"use pipeline\.interop\.ddim_scheduler\.(StrideDDIMScheduler\.from_config\(.*?\)) instead",
                        str(e.value)).group(1)
    made = eval(command, {"StrideDDIMScheduler": StrideDDIMScheduler, "scheduler": scheduler})
    assert made.config.clip_sample is False and torch.equal(made.alphas_cumprod, scheduler.alphas_cumprod)


def test_ddim_pipeline_dropping_the_schedule_warns(tmp_path):
    """DDIMPipeline converts any scheduler to DDIMScheduler in __init__ (also from_pretrained): with a learned
    schedule in the config that is a ScheduleDroppedWarning, not only a log line; DDPMPipeline keeps it."""
    stride = StrideDDIMScheduler(schedule_timesteps=[900, 500, 100, 7])
    with pytest.warns(ScheduleDroppedWarning, match="DDIMScheduler .*DDPMPipeline"):
        pipe = DDIMPipeline(unet=tiny_unet(), scheduler=stride)
    assert type(pipe.scheduler) is DDIMScheduler
    DDPMPipeline(unet=tiny_unet(), scheduler=stride).save_pretrained(tmp_path / "p")
    with pytest.warns(ScheduleDroppedWarning):
        DDIMPipeline.from_pretrained(tmp_path / "p")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ScheduleDroppedWarning)
        kept = DDPMPipeline.from_pretrained(tmp_path / "p")
    assert type(kept.scheduler) is StrideDDIMScheduler
    kept.scheduler.set_timesteps(4)
    assert kept.scheduler.timesteps.tolist() == [900, 500, 100, 7]
