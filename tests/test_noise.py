"""Noise schedules equal diffusers' and the coordinate conversions invert each other."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from pipeline.errors import StridelabError
from pipeline.core.noise import (
    abar_at,
    abar_from_log_snr,
    abar_from_sigma,
    as_alphas_cumprod,
    log_snr_from_abar,
    make_alphas_cumprod,
    sigma_at,
    sigma_from_abar,
    t_from_sigma,
)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("T", [1000, 37])
def test_alphas_cumprod_bit_equal_to_diffusers(beta_schedule, T):
    kw = {"beta_start": 0.00085, "beta_end": 0.012} if beta_schedule == "scaled_linear" else {}
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule=beta_schedule, **kw).alphas_cumprod
    ours = make_alphas_cumprod(beta_schedule, T, **kw)
    assert ours.dtype == torch.float64
    assert torch.equal(ours.float(), ref)


def test_conversions_round_trip():
    ac = make_alphas_cumprod()
    sig = sigma_from_abar(ac)
    torch.testing.assert_close(abar_from_sigma(sig), ac, rtol=1e-12, atol=0)
    torch.testing.assert_close(abar_from_log_snr(log_snr_from_abar(ac)), ac, rtol=1e-12, atol=0)
    torch.testing.assert_close(log_snr_from_abar(ac), -2 * sig.log(), rtol=1e-10, atol=1e-10)
    assert abar_from_sigma(0.0).item() == 1.0


def test_fractional_timesteps_interpolate_log_sigma_and_invert():
    ac = make_alphas_cumprod()
    ints = torch.arange(1000, dtype=torch.float64)
    torch.testing.assert_close(abar_at(ints, ac), ac, rtol=1e-12, atol=0)  # exact at integers
    t = torch.tensor([0.0, 0.25, 10.5, 499.9, 998.999, 999.0], dtype=torch.float64)
    torch.testing.assert_close(t_from_sigma(sigma_at(t, ac), ac), t, rtol=0, atol=1e-9)
    mid = sigma_at(torch.tensor(10.5, dtype=torch.float64), ac)
    s10, s11 = sigma_from_abar(ac[10]), sigma_from_abar(ac[11])
    assert mid.item() == pytest.approx((s10 * s11).sqrt().item(), rel=1e-12)  # geometric mean
    # Out-of-range sigmas clamp to the ends.
    assert t_from_sigma(1e6, ac).item() == 999.0 and t_from_sigma(1e-9, ac).item() == 0.0


def test_bad_tables_and_names_are_refused():
    with pytest.raises(StridelabError, match="unknown beta_schedule 'cosine'; choose one of linear"):
        make_alphas_cumprod("cosine")
    with pytest.raises(StridelabError, match="strictly decreasing"):
        as_alphas_cumprod(torch.tensor([0.5, 0.9]))
    with pytest.raises(StridelabError, match="inside"):
        as_alphas_cumprod(torch.tensor([1.0, 0.9]))
    with pytest.raises(StridelabError, match="out of range"):
        sigma_at(1000.0, make_alphas_cumprod())
