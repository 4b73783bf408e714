"""The drop-in inverse scheduler (`StrideDDIMInverseScheduler`) and the schedule file's optional inverse list.

Checked as the forward drop-in is (tests/test_interop.py): equal to diffusers' `DDIMInverseScheduler` on the
spacings that one handles, equal to `ddim_invert` on any list, config round trips, step outputs, a pinned
full loop on the tiny UNet, and one-line errors.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from diffusers import DDIMInverseScheduler

from tiny import tiny_unet

from pipeline.core.noise import make_alphas_cumprod
from pipeline.core.schedules import Schedule, karras
from pipeline.errors import StridelabError
from pipeline.interop import StrideDDIMInverseScheduler
from pipeline.interop.apply import alphas_cumprod_sha256
from pipeline.interop.ddim_scheduler import StrideDDIMScheduler
from pipeline.models.denoisers import DiffusersDenoiser, gaussian_mixture
from pipeline.solvers.ddim import ddim_invert, ddim_sample
from search.export import export_dict

AC = make_alphas_cumprod("linear", 1000)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        # diffusers 0.42 calls np.array(tensor) under numpy 2 (torch's DeprecationWarning), not ours.
        warnings.filterwarnings("ignore", message=".*__array__ implementation doesn't accept a copy keyword.*")
        yield


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(out_scale=50.0)  # eps O(1): a comparison of near-zero outputs would mean little


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _x0(n: int = 4, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype).clamp(-1, 1)


# --------------------------------------------------------------------------------------------------
# Equal to diffusers where diffusers is right, equal to ddim_invert everywhere


@pytest.mark.parametrize("spacing,offset,alpha_one,n", [
    ("leading", 0, True, 10), ("leading", 1, True, 10), ("leading", 0, False, 7), ("trailing", 0, True, 10),
    ("trailing", 0, False, 8),
])
def test_equals_diffusers_inverse_on_its_uniform_spacing(spacing, offset, alpha_one, n):
    """Same timesteps, and every step's (prev_sample, pred_original_sample) equal to diffusers' on outputs of
    order 1, for leading (any offset) and trailing with N | T, both first-step conventions."""
    cfg = dict(timestep_spacing=spacing, steps_offset=offset, set_alpha_to_one=alpha_one)
    ours, ref = StrideDDIMInverseScheduler(**cfg), DDIMInverseScheduler(clip_sample=False, **cfg)
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    d = gaussian_mixture("blobs64")
    x = y = _x0(6, dtype=torch.float64)
    for t in ours.timesteps:
        a, b = ours.step(d(x, t.expand(6)), t, x), ref.step(d(y, t.expand(6)), t, y)
        # diffusers' abar are float32 scalars: x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) magnifies their
        # rounding by 1 / sqrt(abar) (up to ~150 near T); the step's result stays within 1e-6.
        torch.testing.assert_close(a.pred_original_sample, b.pred_original_sample, atol=2e-5, rtol=0)
        torch.testing.assert_close(a.prev_sample, b.prev_sample, atol=1e-6, rtol=0)
        x, y = a.prev_sample, b.prev_sample
    assert x.abs().max() > 1.0  # noise-sized at the end: the comparison covered the whole range


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
def test_walks_any_list_as_ddim_invert(unet, ptype):
    """The pipelines' loop (model at the label it steps to) over a non-uniform list equals `ddim_invert`
    through the denoiser adapter, for every prediction type; decoding the code returns near the data."""
    schedule = karras(7, AC)
    inverse = StrideDDIMInverseScheduler(prediction_type=ptype, inverse_timesteps=schedule.encode_timesteps)
    inverse.set_timesteps()
    assert inverse.timesteps.tolist() == list(schedule.timesteps[::-1])
    x0 = _x0()
    x = x0
    for t in inverse.timesteps:
        x = inverse.step(unet(x, t.expand(4)).sample, t, x).prev_sample
    ref = ddim_invert(DiffusersDenoiser(unet, AC, ptype), x0, schedule.timesteps, AC)
    torch.testing.assert_close(x, ref, atol=2e-5, rtol=0)
    assert (x - x0).abs().max() > 0.5  # it moved: the equality is not of two no-ops
    if ptype == "epsilon":  # and the forward drop-in decodes it as ddim_sample does
        fwd = StrideDDIMScheduler(schedule_timesteps=schedule.timesteps)
        fwd.set_timesteps()
        y = x
        for t in fwd.timesteps:
            y = fwd.step(unet(y, t.expand(4)).sample, t, y).prev_sample
        ref = ddim_sample(DiffusersDenoiser(unet, AC), x, schedule.timesteps, AC)
        # The forward drop-in steps in float64 and rounds once, ddim_sample in float32: each is a few 1e-7 of
        # the output's scale from float64 truth (this net's outputs reach thousands), so compare at that scale.
        torch.testing.assert_close(y, ref, atol=1e-6 * float(ref.abs().max()), rtol=0)


def test_full_loop_pinned(unet):
    """A 10-step leading inversion of fixed data with the tiny UNet, pinned to numbers computed once here."""
    s = StrideDDIMInverseScheduler()
    s.set_timesteps(10)
    x = _x0(seed=3)
    for t in s.timesteps:
        x = s.step(unet(x, t.expand(4)).sample, t, x).prev_sample
    # torch 2.14.1 on this CPU; relative 1e-5 leaves room for other kernels, not for another update.
    assert x.sum().item() == pytest.approx(2251.4333, rel=1e-5)
    assert x.abs().sum().item() == pytest.approx(3478.2935, rel=1e-5)


def test_step_outputs():
    s = StrideDDIMInverseScheduler()
    s.set_timesteps(timesteps=[3, 40, 900])
    x = _x0(2)
    out = s.step(torch.zeros_like(x), 3, x)
    assert out.prev_sample.shape == out.pred_original_sample.shape == x.shape
    torch.testing.assert_close(out.pred_original_sample, x)  # from abar = 1 the x0 estimate is x itself
    prev, x0 = s.step(torch.zeros_like(x), 40, x, return_dict=False)
    assert prev.shape == x0.shape == x.shape
    assert s.previous_timestep(40) == 3 and s.previous_timestep(3) == -1
    assert len(s) == 1000 and s.scale_model_input(x, 3) is x


# --------------------------------------------------------------------------------------------------
# Configs


def test_config_round_trip(tmp_path):
    s = StrideDDIMInverseScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   prediction_type="v_prediction", set_alpha_to_one=False, inverse_timesteps=(3, 40, 900))
    s.save_pretrained(tmp_path)
    back = StrideDDIMInverseScheduler.from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(back.config) == public(s.config)
    assert back.config.inverse_timesteps == [3, 40, 900]
    torch.testing.assert_close(back.alphas_cumprod, s.alphas_cumprod, atol=0, rtol=0)
    assert back.initial_alpha_cumprod == pytest.approx(float(s.alphas_cumprod[0]))
    # Configs move between it and diffusers' inverse scheduler both ways.
    assert "DDIMInverseScheduler" in [c.__name__ for c in s.compatibles]
    assert DDIMInverseScheduler.from_config(s.config).config.prediction_type == "v_prediction"
    ours = StrideDDIMInverseScheduler.from_config(DDIMInverseScheduler(clip_sample=False, steps_offset=1).config)
    assert ours.config.steps_offset == 1 and ours.config.inverse_timesteps is None


def test_from_schedule_takes_the_encoder_list_and_checks_the_model():
    fingerprint = {"alphas_cumprod_sha256": alphas_cumprod_sha256(AC)}
    sched = Schedule((900, 500, 100, 10), 1000, meta=fingerprint, inverse_timesteps=(5, 30, 120, 400, 700, 900))
    inv = StrideDDIMInverseScheduler.from_schedule(sched)
    assert inv.config.inverse_timesteps == [5, 30, 120, 400, 700, 900]
    plain = StrideDDIMInverseScheduler.from_schedule(Schedule((900, 500, 100, 10), 1000, meta=fingerprint))
    assert plain.config.inverse_timesteps == [10, 100, 500, 900]
    other = {"alphas_cumprod_sha256": alphas_cumprod_sha256(make_alphas_cumprod("scaled_linear", 1000, 0.00085, 0.012))}
    with pytest.raises(StridelabError, match="StrideDDIMInverseScheduler"):
        StrideDDIMInverseScheduler.from_schedule(Schedule((900, 10), 1000, meta=other))


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(StridelabError, match=r"timesteps\[2\] = 30 is not increasing"):
        StrideDDIMInverseScheduler().set_timesteps(timesteps=[3, 40, 30])
    with pytest.raises(StridelabError, match="a duplicate"):
        StrideDDIMInverseScheduler(inverse_timesteps=[3, 3])
    with pytest.raises(StridelabError, match="out of range"):
        StrideDDIMInverseScheduler(inverse_timesteps=[3, 1000])
    with pytest.raises(StridelabError, match="num_inference_steps=2"):
        StrideDDIMInverseScheduler(inverse_timesteps=[3, 40]).set_timesteps(5)
    with pytest.raises(StridelabError, match="not both"):
        StrideDDIMInverseScheduler().set_timesteps(3, timesteps=[1, 3, 9])
    with pytest.raises(StridelabError, match=r"StrideDDIMInverseScheduler does not support clip_sample=True"):
        # As Hub configs write it; a default left unwritten is dropped by from_config (diffusers' rule).
        StrideDDIMInverseScheduler.from_config(DDIMInverseScheduler(clip_sample=True).config)
    with pytest.raises(StridelabError, match="choose one of epsilon, v_prediction, sample"):
        StrideDDIMInverseScheduler(prediction_type="flow")
    s = StrideDDIMInverseScheduler()
    with pytest.raises(StridelabError, match="set_timesteps"):
        s.step(torch.zeros(1, 2), 5, torch.zeros(1, 2))
    s.set_timesteps(timesteps=[3, 40])
    with pytest.raises(StridelabError, match=r"timestep 41 is not one of .*\[3, 40\]"):
        s.step(torch.zeros(1, 2), 41, torch.zeros(1, 2))


# --------------------------------------------------------------------------------------------------
# The schedule file carries both directions when they differ


def test_schedule_file_carries_the_inverse_only_when_it_differs(tmp_path):
    both = Schedule((900, 500, 100), 1000, "learned", inverse_timesteps=(2, 20, 100, 300, 900))
    assert both.encode_timesteps == (2, 20, 100, 300, 900)
    back = Schedule.load(both.save(tmp_path / "both.json"))
    assert back == both and back.inverse_timesteps == (2, 20, 100, 300, 900)

    same = Schedule((900, 500, 100), 1000, inverse_timesteps=[100, 500, 900])
    assert same.inverse_timesteps is None and "inverse_timesteps" not in same.to_dict()
    assert same.encode_timesteps == (100, 500, 900)
    # A file from before the field loads as it did, its encoder the reversed forward list.
    old = {"schema_version": 1, "name": "uniform", "nfe": 2, "num_train_timesteps": 1000, "timesteps": [500, 0]}
    assert Schedule.from_dict(json.loads(json.dumps(old))).encode_timesteps == (0, 500)

    exported = export_dict(both, model="gmm:ring8", sigmas=both.sigmas(AC).tolist(), alphas_hash=alphas_cumprod_sha256(AC))
    assert exported["inverse_timesteps"] == [2, 20, 100, 300, 900]
    assert Schedule.from_dict(exported).inverse_timesteps == both.inverse_timesteps


def test_schedule_inverse_list_is_validated():
    with pytest.raises(StridelabError, match=r"inverse_timesteps\[1\] = 5 is not increasing"):
        Schedule((900, 10), 1000, inverse_timesteps=(10, 5, 900))
    with pytest.raises(StridelabError, match="ends at 800 but decoding starts at timesteps\\[0\\] = 900"):
        Schedule((900, 10), 1000, inverse_timesteps=(10, 800))
    with pytest.raises(StridelabError, match="inverse_timesteps is empty"):
        Schedule.from_dict({"timesteps": [900, 10], "inverse_timesteps": []})
