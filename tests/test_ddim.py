"""The DDIM core against diffusers, closed forms and a many-step teacher."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.models.unets.unet_2d import UNet2DOutput

from tiny import tiny_unet as tiny_unet_of

from pipeline.solvers.ddim import ddim_invert, ddim_sample, ddim_sigma, ddim_step
from pipeline.core.batching import BatchInvariant
from pipeline.models.denoisers import DiffusersDenoiser, GaussianMixtureDenoiser, gaussian_mixture
from pipeline.errors import StridelabError
from pipeline.core.noise import make_alphas_cumprod
from pipeline.core.schedules import make_schedule, uniform
from pipeline.core.seeds import initial_noise, make_generators

AC = make_alphas_cumprod("linear", 1000)


@pytest.fixture(scope="module")
def tiny_unet() -> UNet2DModel:
    return tiny_unet_of(out_scale=50.0)  # eps O(1), so the comparison means something


class _UnitScaleUNet(torch.nn.Module):
    """The tiny UNet (its random init, unscaled: output std ~0.3) added to the exact eps of N(0, I) data,
    sqrt(1 - abar_t) x_t. The sum is an eps that keeps x_t on the data's scale, so every step and the
    final x_0 stay O(1) (std ~2, max < 10) and an absolute tolerance is a tolerance on the update rule;
    the UNet's share is large enough that dropping it moves x_0 by O(1). Called like a UNet2DModel."""

    def __init__(self, unet: UNet2DModel, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.unet = unet
        self.register_buffer("sqrt_one_minus_abar", (1 - alphas_cumprod.double()).sqrt())

    def forward(self, x: torch.Tensor, t) -> UNet2DOutput:
        t = torch.as_tensor(t).reshape(-1).expand(x.shape[0])
        exact = self.sqrt_one_minus_abar[t].to(x.dtype).view(-1, 1, 1, 1) * x
        return UNet2DOutput(sample=exact + self.unet(x, t).sample)


@pytest.fixture(scope="module")
def unit_unet() -> _UnitScaleUNet:
    return _UnitScaleUNet(tiny_unet_of(), AC).eval().double()


def _diffusers_ddim(unet, x, n, eta, noises):
    sched = DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, set_alpha_to_one=True,
        timestep_spacing="leading", steps_offset=0,
    )
    sched.set_timesteps(n)
    for i, t in enumerate(sched.timesteps):
        with torch.no_grad():
            eps = unet(x, t).sample
        x = sched.step(eps, t, x, eta=eta, variance_noise=noises[i]).prev_sample
    return x, [int(t) for t in sched.timesteps]


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("n", [4, 10])
def test_matches_diffusers_ddim_on_uniform_schedule(unit_unet, eta, n):
    """Equal to diffusers' DDIM to 1e-5 absolute on outputs of order 1 (the README's claim).

    float64 throughout, except that diffusers keeps its alphas_cumprod in float32: that limits the
    agreement to ~1e-6 here (measured 2e-7 .. 8e-7), so 1e-5 has a 10x margin and no relative slack."""
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    noises = [torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(n)]
    ref, ts = _diffusers_ddim(unit_unet, x_T, n, eta, noises)

    sched = uniform(n, AC)
    assert list(sched.timesteps) == ts  # our "uniform" is diffusers' leading spacing
    ours = ddim_sample(DiffusersDenoiser(unit_unet, AC), x_T, sched.timesteps, AC, eta=eta,
                       noise_sampler=lambda i, x: noises[i])
    # outputs of order 1, so an absolute 1e-5 is tight: not two near-zero tensors, not values in the 1000s
    assert 1.0 < ref.abs().max() < 10.0 and 0.5 < ref.std() < 5.0, (ref.abs().max(), ref.std())
    # the UNet matters: without it (the exact-eps part alone) x_0 is far away
    exact_only = ddim_sample(lambda x, t: unit_unet.sqrt_one_minus_abar[t].to(x.dtype).view(-1, 1, 1, 1) * x,
                             x_T, sched.timesteps, AC, eta=eta, noise_sampler=lambda i, x: noises[i])
    assert (exact_only - ref).abs().max() > 0.5
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_nonuniform_list_uses_next_listed_timestep():
    """A non-uniform list: each step must jump to the next listed timestep (diffusers' DDIM cannot)."""
    d = gaussian_mixture("ring8")
    ts = [900, 400, 120, 7]
    seen = []
    x_T, _ = initial_noise(range(8), (2,))
    ddim_sample(d, x_T, ts, AC, callback=lambda info: seen.append((info["t"], info["t_next"])))
    assert seen == [(900, 400), (400, 120), (120, 7), (7, -1)]
    # And the result equals composing ddim_step by hand with those exact levels.
    x = x_T
    for t, s in seen:
        eps = d(x, torch.full((8,), t))
        x, _ = ddim_step(x, eps, AC[t].item(), AC[s].item() if s >= 0 else 1.0)
    torch.testing.assert_close(ddim_sample(d, x_T, ts, AC), x, atol=0, rtol=0)


def _gaussian_pf_ode_solution(x_T, mu, s, abar_T):
    """Exact probability-flow ODE map from level abar_T to clean data for x0 ~ N(mu, s^2 I): the flow of a
    Gaussian family is the monotone affine map between its marginals N(sqrt(abar) mu, abar s^2 + 1 - abar)."""
    v_T = abar_T * s**2 + 1 - abar_T
    return mu + s * (x_T - math.sqrt(abar_T) * mu) / math.sqrt(v_T)


def test_converges_to_closed_form_with_first_order_rate():
    """Single Gaussian data: DDIM -> the exact PF-ODE map, error halving as NFE doubles.

    A T = 1000 table puts a floor under the error (even the 1000-step DDIM is ~5e-3 away from the
    continuous ODE), so the rate is measured on a 20x finer table of the same continuous process
    (linear betas / 20, T = 20000)."""
    fine = make_alphas_cumprod("linear", 20000, 0.0001 / 20, 0.02 / 20)
    mu, s = 0.5, 0.2
    d = GaussianMixtureDenoiser(torch.full((1, 16), mu, dtype=torch.float64), s, alphas_cumprod=fine)
    x_T, _ = initial_noise(range(64), (16,), dtype=torch.float64)
    errors = {}
    for n in (25, 50, 100, 200, 400, 800):
        ts = make_schedule("logsnr", n, fine).timesteps  # starts at T-1: the same x_T level for every n
        exact = _gaussian_pf_ode_solution(x_T, mu, s, fine[ts[0]].item())
        errors[n] = (ddim_sample(d, x_T, ts, fine) - exact).abs().max().item()
    ratios = [errors[2 * n] / errors[n] for n in (25, 50, 100, 200, 400)]
    assert errors[800] < 3e-3
    for r in ratios:
        assert 0.45 < r < 0.55, (errors, ratios)


def test_eta_one_is_the_ddpm_posterior_variance():
    ddpm = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, variance_type="fixed_small")
    for t in (1, 10, 100, 500, 999):
        ours = ddim_sigma(AC[t].item(), AC[t - 1].item(), eta=1.0) ** 2
        theirs = ddpm._get_variance(t).item()
        # diffusers forms 1 - abar_t / abar_{t-1} in float32: that cancellation limits agreement to ~1e-4.
        assert ours == pytest.approx(theirs, rel=5e-4)


def test_eta_one_over_all_steps_equals_ddpm_ancestral_sampling():
    """DDIM with eta = 1 on every timestep is DDPM: compare with diffusers' DDPMScheduler, same noise.

    DDPMScheduler.step draws z from the generator it is given whenever t > 0; our sampler draws exactly
    when sigma > 0 (every step but the last), so two generators with one seed give both the same z."""
    d = gaussian_mixture("ring8")
    T = 1000
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ddpm = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=False, variance_type="fixed_small")
    ddpm.set_timesteps(T)
    g_ref, g_ours = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    x = x_T
    for t in ddpm.timesteps:
        eps = d(x, torch.full((16,), int(t)))
        x = ddpm.step(eps, t, x, generator=g_ref).prev_sample
    ours = ddim_sample(d, x_T, list(range(T - 1, -1, -1)), AC, eta=1.0,
                       noise_sampler=lambda i, x_: torch.randn(x_.shape, generator=g_ours, dtype=x_.dtype))
    assert (ours - x_T).abs().max() > 0.5
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)


def test_eta_one_empirical_variance():
    """One eta = 1 step from a fixed x_t: the spread of x_s is the posterior std (statistical check)."""
    t, s = 500, 499
    x_t = torch.zeros(20000, 1, dtype=torch.float64)
    eps = torch.full_like(x_t, 0.3)
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_s, _ = ddim_step(x_t, eps, AC[t].item(), AC[s].item(), eta=1.0, noise=z)
    expected = ddim_sigma(AC[t].item(), AC[s].item(), 1.0)
    assert x_s.std().item() == pytest.approx(expected, rel=0.03)


def test_inversion_round_trip_error_falls_with_nfe():
    d = gaussian_mixture("blobs64")
    x0 = d.sample_data(range(64)).double()
    errs = []
    for n in (10, 50, 250):
        ts = make_schedule("uniform", n, AC).timesteps
        x_T = ddim_invert(d, x0, ts, AC)
        errs.append(((ddim_sample(d, x_T, ts, AC) - x0) ** 2).mean().item())
    assert errs[0] > errs[1] > errs[2], errs
    assert errs[2] < 1e-4


def test_recon_error_vs_teacher_falls_with_nfe():
    d = gaussian_mixture("ring8")
    x_T, _ = initial_noise(range(128), (2,), dtype=torch.float64)
    teacher = ddim_sample(d, x_T, list(range(999, -1, -1)), AC)
    errs = [((ddim_sample(d, x_T, make_schedule("karras", n, AC).timesteps, AC) - teacher) ** 2).mean().item()
            for n in (5, 20, 80)]
    assert errs[0] > errs[1] > errs[2], errs


def test_per_sample_seeds_batch_invariant_bitwise(tiny_unet):
    """Sample i is bit-identical alone and inside a batch of 64, deterministic and with eta > 0."""
    ts = make_schedule("karras", 6, AC).timesteps
    unet_den = BatchInvariant(DiffusersDenoiser(tiny_unet, AC), micro_batch=16)  # see BatchInvariant's note
    for den, shape in ((gaussian_mixture("blobs64"), (1, 8, 8)), (unet_den, (1, 8, 8))):
        for eta in (0.0, 1.0):
            seeds = list(range(100, 164))
            x_T, gens = initial_noise(seeds, shape)
            batch = ddim_sample(den, x_T, ts, AC, eta=eta, generator=gens)
            for i in (0, 17, 63):
                x1, g1 = initial_noise([seeds[i]], shape)
                single = ddim_sample(den, x1, ts, AC, eta=eta, generator=g1)
                assert torch.equal(single[0], batch[i]), (type(den).__name__, eta, i)


def test_bad_arguments_raise_one_line_errors():
    d = gaussian_mixture("ring8")
    x = torch.zeros(2, 2)
    with pytest.raises(StridelabError, match="eta"):
        ddim_sample(d, x, [10, 5], AC, eta=1.5)
    with pytest.raises(StridelabError, match="generator"):
        ddim_sample(d, x, [10, 5], AC, eta=0.5)
    with pytest.raises(StridelabError, match="strictly decreasing"):
        ddim_sample(d, x, [5, 10], AC)
    with pytest.raises(StridelabError, match="2 samples"):
        ddim_sample(d, x, [10, 5], AC, eta=0.5, generator=make_generators([1, 2, 3]))
