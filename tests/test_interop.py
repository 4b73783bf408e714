"""Reusing schedules elsewhere: the drop-in diffusers DDIM scheduler, `apply_schedule` on diffusers'
schedulers, k-diffusion sigmas and plain JSON. Real diffusers objects throughout (a tiny random UNet saved
and loaded locally); the analytic mixture stands in for a trained model where convergence is measured."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

from tiny import tiny_unet

from pipeline.solvers.ddim import ddim_sample
from pipeline.interop.ddim_scheduler import StrideDDIMScheduler
from pipeline.models.denoisers import DiffusersDenoiser, gaussian_mixture
from pipeline.errors import StridelabError
from pipeline.interop.apply import SUPPORTED_SCHEDULERS, alphas_cumprod_sha256, apply_schedule, check_compatible, model_evaluations, sigmas_for_pipeline, timesteps_for_pipeline
from pipeline.interop.sigma_lists import k_diffusion_sigmas, schedule_from_sigmas, to_plain_json
from pipeline.core.noise import abar_at, make_alphas_cumprod
from pipeline.core.schedules import SCHEDULES, Schedule, karras, make_schedule

AC = make_alphas_cumprod("linear", 1000)
AC_SD = make_alphas_cumprod("scaled_linear", 1000, 0.00085, 0.012)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        # diffusers 0.42 calls np.array(tensor) under numpy 2 (torch's DeprecationWarning), not ours.
        warnings.filterwarnings("ignore", message=".*__array__ implementation doesn't accept a copy keyword.*")
        yield


def _exported(schedule: Schedule, abar: torch.Tensor = AC) -> Schedule:
    """A schedule as `stridelab export` writes it: the model fingerprint in meta."""
    meta = {"model": "tiny-unet", "alphas_cumprod_sha256": alphas_cumprod_sha256(abar)}
    return Schedule(schedule.timesteps, schedule.num_train_timesteps, schedule.name, schedule.params, meta)


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    """A DDPMPipeline (tiny random UNet2DModel, DDPMScheduler as the Hub checkpoints ship it) on disk."""
    unet = tiny_unet(out_scale=50.0)  # random init outputs ~0: eps O(1), so every comparison means something
    d = tmp_path_factory.mktemp("ddpm")
    # clip_sample=True written explicitly, as in google/ddpm-* configs.
    DDPMPipeline(unet=unet.eval(), scheduler=DDPMScheduler(clip_sample=True)).save_pretrained(d)
    return d


# --------------------------------------------------------------------------------------------------
# StrideDDIMScheduler


def test_stride_scheduler_runs_a_diffusers_pipeline_and_matches_ddim_sample(pipe_dir, tmp_path):
    """The real `DDPMPipeline.__call__` (which only calls set_timesteps(num_inference_steps)) runs an
    exported non-uniform schedule held in the scheduler config, after a save/load of the whole pipeline,
    and its unclamped final sample equals `ddim_sample` on the same x_T."""
    path = _exported(karras(7, AC)).save(tmp_path / "schedule.json")
    schedule = Schedule.load(path)
    assert len(set(b - a for a, b in zip(schedule.timesteps[1:], schedule.timesteps))) > 1  # non-uniform

    pipe = DDPMPipeline.from_pretrained(pipe_dir)
    with pytest.raises(StridelabError, match="clip_sample=False"):
        StrideDDIMScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler = StrideDDIMScheduler.from_schedule(schedule, pipe.scheduler.config, clip_sample=False)
    pipe.save_pretrained(tmp_path / "stride")
    pipe = DDPMPipeline.from_pretrained(tmp_path / "stride")
    assert type(pipe.scheduler) is StrideDDIMScheduler
    assert pipe.scheduler.config.schedule_timesteps == list(schedule.timesteps)

    # Spy on step: the pipeline clamps its output image to [0, 1]; the last prev_sample is x_0 itself.
    seen, real_step = [], pipe.scheduler.step

    def spy(model_output, t, sample, **kw):
        out = real_step(model_output, t, sample, **kw)
        seen.append((int(t), out.prev_sample))
        return out

    pipe.scheduler.step = spy
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=4, generator=torch.Generator().manual_seed(3), num_inference_steps=7, output_type="pt").images

    # DDPMPipeline draws x_T as randn_tensor(shape, generator) on the CPU: the same draw here.
    # The scheduler steps in float64 and holds x in float32 between steps (as the pipeline does): against a
    # float64 ddim_sample it is 1.5e-7 of the largest |x| (5.9e3 with this eps ~ 50 net) off; a float32
    # ddim_sample 3.3e-7.
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    ref = ddim_sample(DiffusersDenoiser(pipe.unet, AC), x_T.double(), schedule.timesteps, AC).float()
    assert [t for t, _ in seen] == list(schedule.timesteps)
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(seen[-1][1], ref, atol=3e-7 * ref.abs().max().item(), rtol=0)
    torch.testing.assert_close(images, (ref / 2 + 0.5).clamp(0, 1), atol=1.5e-7 * ref.abs().max().item(), rtol=0)

    with pytest.raises(StridelabError, match="num_inference_steps=7"):
        pipe(batch_size=1, num_inference_steps=50)


def test_stride_scheduler_config_round_trip(tmp_path):
    s = StrideDDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                            prediction_type="v_prediction", timestep_spacing="trailing", schedule_timesteps=(900, 40, 3))
    s.save_config(tmp_path)
    back = StrideDDIMScheduler.from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(back.config) == public(s.config)
    assert back.config.schedule_timesteps == [900, 40, 3]
    torch.testing.assert_close(back.alphas_cumprod.double(), AC_SD, atol=0, rtol=0)  # bit-equal to diffusers'
    # Configs move between it and diffusers' schedulers both ways.
    assert "DDIMScheduler" in [c.__name__ for c in s.compatibles]
    assert DDIMScheduler.from_config(s.config).config.prediction_type == "v_prediction"
    assert StrideDDIMScheduler.from_config(DDIMScheduler(clip_sample=False).config).config.num_train_timesteps == 1000


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_without_a_schedule_it_is_diffusers_ddim(spacing):
    """set_timesteps(n) places diffusers' spacings, and on those even steps `step` equals DDIMScheduler's."""
    ours = StrideDDIMScheduler(timestep_spacing=spacing)
    ref = DDIMScheduler(clip_sample=False, set_alpha_to_one=True, timestep_spacing=spacing)
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    if spacing != "leading":
        return  # DDIMScheduler's t - T // N is only right for leading spacing
    d = gaussian_mixture("blobs64")
    x = y = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in ours.timesteps:
        x = ours.step(d(x, t.expand(6)), t, x).prev_sample
        y = ref.step(d(y, t.expand(6)), t, y).prev_sample
    torch.testing.assert_close(x, y, atol=1e-6, rtol=0)


def test_set_timesteps_through_retrieve_timesteps_and_eta():
    """Pipelines that pass timesteps= (retrieve_timesteps) get ours; diffusers' DDIM refuses them.
    eta = 1 with the same per-step noise equals ddim_sample's ancestral path; v and x0 outputs convert."""
    ts = [950, 610, 333, 90, 12]
    s = StrideDDIMScheduler()
    out, n = retrieve_timesteps(s, timesteps=ts)
    assert out.tolist() == ts and n == 5
    with pytest.raises(ValueError, match="custom"):
        retrieve_timesteps(DDIMScheduler(), timesteps=ts)

    d = gaussian_mixture("blobs64")
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    noises = torch.randn(5, 4, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = ddim_sample(d, x_T, ts, AC, eta=1.0, noise_sampler=lambda i, x: noises[i])
    for ptype in ("epsilon", "v_prediction", "sample"):
        sched = StrideDDIMScheduler(prediction_type=ptype)
        sched.set_timesteps(timesteps=ts)
        x = x_T
        for i, t in enumerate(sched.timesteps):
            eps = d(x, t.expand(4))
            a = AC[t]
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            output = {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0, "sample": x0}[ptype]
            x = sched.step(output, t, x, eta=1.0, variance_noise=noises[i]).prev_sample
        torch.testing.assert_close(x, ref, atol=1e-9, rtol=0, msg=ptype)
    assert sched.previous_timestep(333) == 90 and sched.previous_timestep(12) == -1


def test_stride_scheduler_bad_inputs_are_one_line_errors():
    with pytest.raises(StridelabError, match=r"timesteps\[2\] = 500 is not decreasing"):
        StrideDDIMScheduler().set_timesteps(timesteps=[900, 400, 500])
    with pytest.raises(StridelabError, match="out of range"):
        StrideDDIMScheduler(schedule_timesteps=[1000, 3])
    with pytest.raises(StridelabError, match="not both"):
        StrideDDIMScheduler().set_timesteps(3, timesteps=[9, 3, 1])
    with pytest.raises(StridelabError, match="thresholding=False"):
        StrideDDIMScheduler(thresholding=True)
    with pytest.raises(StridelabError, match="choose one of epsilon, v_prediction, sample"):
        StrideDDIMScheduler(prediction_type="flow")
    s = StrideDDIMScheduler()
    with pytest.raises(StridelabError, match="set_timesteps"):
        s.step(torch.zeros(1, 2), 5, torch.zeros(1, 2))
    s.set_timesteps(timesteps=[900, 400])
    with pytest.raises(StridelabError, match=r"timestep 401 is not one of .*\[900, 400\]"):
        s.step(torch.zeros(1, 2), 401, torch.zeros(1, 2))
    with pytest.raises(StridelabError, match="the whole table|T = 1000"):
        StrideDDIMScheduler.from_schedule(Schedule((50, 3), 100))


# --------------------------------------------------------------------------------------------------
# diffusers' schedulers under apply_schedule


class _MixtureAsModel:
    """The analytic mixture as a diffusers model: eps at a (possibly fractional, float) timestep."""

    def __init__(self, abar: torch.Tensor = AC):
        self.d = gaussian_mixture("blobs64", abar)
        self.abar = abar

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = abar_at(torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(x.shape[0]), self.abar)
        return self.d.eps_at_abar(x, a)


def _run(scheduler, model, x_T):
    """The denoising loop every diffusers pipeline runs."""
    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return x


def _x_T(dtype=torch.float64, n=32):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(7), dtype=dtype)


# Tolerances: measured worst cases over these schedules plus karras 10 and ays 9 (32 samples, |x_0| <= 1.2),
# then ~5x margin. DPM-Solver-1 in data-prediction form is DDIM algebraically, and so is Euler on the
# PF-ODE in (sigma, x / sqrt(abar)) coordinates. What is left: diffusers keeps sigmas in float32 (relative
# error ~6e-8 per level) and EulerDiscrete recovers its timesteps from float32 sigmas (within 6e-5 of the
# integers): measured max 4e-7 (DPM) and 1.8e-6 (Euler) in float64. In float32 the first steps divide by
# sqrt(abar_999) ~ 0.006, amplifying rounding ~160x: measured max 3.0e-5 (DPM) and 2.7e-5 (Euler).
TOL = {torch.float64: 1e-5, torch.float32: 1.5e-4}
SCHEDS = {
    "karras7": karras(7, AC),
    "logsnr5": make_schedule("logsnr", 5, AC),
    "uniform12": make_schedule("uniform", 12, AC),
    "hand": Schedule((980, 700, 420, 200, 61, 9), 1000),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(SCHEDS))
def test_dpm_solver_1_and_euler_equal_ddim_on_the_applied_schedule(name, dtype):
    schedule = SCHEDS[name]
    model = _MixtureAsModel()
    x_T = _x_T(dtype)
    ref = ddim_sample(lambda x, t: model(x, t[0].double()).to(x.dtype), x_T, schedule.timesteps, AC)
    dpm1 = apply_schedule(DPMSolverMultistepScheduler(solver_order=1, algorithm_type="dpmsolver++"), schedule, AC)
    # timestep_spacing="leading": init_noise_sigma = sqrt(sigma_max^2 + 1), exact VE scaling (see apply_schedule).
    euler = apply_schedule(EulerDiscreteScheduler(timestep_spacing="leading"), schedule, AC)
    assert dpm1.timesteps.tolist() == list(schedule.timesteps)
    assert (euler.timesteps.double() - torch.tensor(schedule.timesteps)).abs().max() < 1e-3  # measured 6e-5
    for sched in (dpm1, euler):
        err = (_run(sched, model, x_T) - ref).abs().max().item()
        assert err < TOL[dtype], (type(sched).__name__, err)
    assert ref.abs().max() > 0.5


def test_second_order_solvers_and_euler_converge_to_the_exact_solution():
    """Single Gaussian data, where the probability-flow ODE from x_T has a closed form: under applied
    schedules of growing NFE every scheduler approaches it; Euler tracks DDIM; DPM-Solver++ 2M beats it.

    Measured RMS errors (logsnr, n = 4 / 8 / 16 / 32): DDIM 0.098 / 0.060 / 0.031 / 0.016, DPM++2M
    0.049 / 0.0018 / 0.0037 / 0.0009 (not monotone: its error changes sign), Heun (2n - 1 evaluations)
    0.79 / 0.074 / 0.0125 / 0.0025. (HeunDiscreteScheduler's default betas are 0.00085..0.012: built with
    defaults it runs another noise table and floors at 0.056; passing alphas_cumprod makes that an error.)"""
    mu, std = 0.5, 0.2
    model = _MixtureAsModel()
    model.d = gaussian_mixture("gauss", AC)
    x_T = _x_T(n=8)
    a_T = AC[999].item()
    exact = mu + std * (x_T - a_T**0.5 * mu) / (a_T * std**2 + 1 - a_T) ** 0.5
    rms = lambda x: ((x - exact) ** 2).mean().sqrt().item()  # noqa: E731
    errs: dict[str, dict[int, float]] = {}
    for n in (4, 8, 32):
        s = make_schedule("logsnr", n, AC)  # starts at T - 1: the same x_T level for every n
        errs.setdefault("ddim", {})[n] = rms(ddim_sample(lambda x, t: model(x, t[0].double()), x_T, s.timesteps, AC))
        for label, sched in [("euler", EulerDiscreteScheduler(timestep_spacing="leading")),
                             ("dpm2", DPMSolverMultistepScheduler(solver_order=2)),
                             ("heun", HeunDiscreteScheduler(beta_start=0.0001, beta_end=0.02, timestep_spacing="leading"))]:
            errs.setdefault(label, {})[n] = rms(_run(apply_schedule(sched, s, AC), model, x_T))
    for label, e in errs.items():
        assert e[32] < e[8] < e[4], (label, errs)
    assert all(abs(errs["euler"][n] - errs["ddim"][n]) < 1e-5 for n in (4, 8, 32)), errs
    assert errs["ddim"][32] < 0.02 and errs["dpm2"][32] < 0.1 * errs["ddim"][32], errs
    assert errs["dpm2"][8] < 0.1 * errs["ddim"][8], errs
    assert errs["heun"][32] < 0.25 * errs["ddim"][32], errs
    with pytest.raises(StridelabError, match="differ from HeunDiscreteScheduler's own table"):
        apply_schedule(HeunDiscreteScheduler(), make_schedule("logsnr", 4, AC), AC)


def test_ddpm_scheduler_runs_the_schedule_as_ancestral_ddim():
    """DDPMScheduler with custom timesteps is DDIM with eta = 1 between the listed steps (same noise)."""
    schedule = Schedule((980, 700, 420, 200, 61, 9), 1000)
    sched = apply_schedule(DDPMScheduler(clip_sample=False), schedule, AC)
    assert sched.timesteps.tolist() == list(schedule.timesteps)
    model, x_T = _MixtureAsModel(), _x_T()
    g = torch.Generator().manual_seed(9)
    x = x_T
    for t in sched.timesteps:  # DDPMScheduler draws randn(shape, generator) once per step with t > 0
        x = sched.step(model(x, t), t, x, generator=g).prev_sample
    g = torch.Generator().manual_seed(9)
    ref = ddim_sample(lambda x, t: model(x, t[0].double()), x_T, schedule.timesteps, AC, eta=1.0,
                      noise_sampler=lambda i, x: torch.randn(x.shape, generator=g, dtype=x.dtype))
    # diffusers forms 1 - abar_t / abar_s in float32 (see tests/test_ddim.py): ~1e-5 agreement.
    torch.testing.assert_close(x, ref, atol=1e-4, rtol=0)
    assert (x - ddim_sample(lambda x, t: model(x, t[0].double()), x_T, schedule.timesteps, AC)).abs().max() > 0.01


def test_apply_schedule_refuses_what_cannot_work():
    s = _exported(karras(7, AC))
    for sched in (DDIMScheduler(), PNDMScheduler()):
        with pytest.raises(StridelabError, match=type(sched).__name__) as e:
            apply_schedule(sched, s)
        assert all(name in str(e.value) for name in SUPPORTED_SCHEDULERS)
    with pytest.raises(StridelabError, match="StrideDDIMScheduler.from_config"):
        apply_schedule(DDIMScheduler(), s)
    # Another noise schedule: the hash in meta catches it; T always.
    sd = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    with pytest.raises(StridelabError, match="tiny-unet .*alphas_cumprod sha256"):
        apply_schedule(sd, s)
    with pytest.warns(UserWarning, match="sha256"):
        apply_schedule(sd, s, allow_other_model=True)
    with pytest.raises(StridelabError, match="T = 1000 .* T = 500"):
        apply_schedule(DPMSolverMultistepScheduler(num_train_timesteps=500), s)
    plain = Schedule(s.timesteps, 1000)  # no fingerprint: only the alphas_cumprod argument can tell
    with pytest.warns(UserWarning, match="only T was checked"):
        apply_schedule(sd, plain)
    with pytest.raises(StridelabError, match="differ from DPMSolverMultistepScheduler's own table"):
        apply_schedule(sd, plain, AC)
    # Config that cannot take custom steps: diffusers' ValueError as one StridelabError.
    with pytest.raises(StridelabError, match="DPMSolverMultistepScheduler refused the schedule: .*use_karras_sigmas"):
        apply_schedule(DPMSolverMultistepScheduler(use_karras_sigmas=True), s)
    with pytest.warns(UserWarning, match="final_sigmas_type='zero'"):
        apply_schedule(DPMSolverMultistepScheduler(final_sigmas_type="sigma_min"), s)
    low = Schedule((400, 100, 10), 1000)  # sigma_max ~0.8: the linspace init_noise_sigma is far off
    with pytest.warns(UserWarning, match="timestep_spacing='leading'"):
        apply_schedule(EulerDiscreteScheduler(), low, AC)
    assert model_evaluations(HeunDiscreteScheduler(), 7) == 13
    assert model_evaluations(StrideDDIMScheduler(), 7) == 7


def test_pipeline_helpers_go_through_retrieve_timesteps():
    s = _exported(karras(8, AC))
    ts = timesteps_for_pipeline(s)
    assert ts == list(s.timesteps) and all(type(t) is int for t in ts)
    out, n = retrieve_timesteps(DPMSolverMultistepScheduler(), timesteps=ts)
    assert out.tolist() == ts and n == 8
    sig = sigmas_for_pipeline(s, AC)
    assert len(sig) == 9 and sig[-1] == 0.0 and sig == sorted(sig, reverse=True)
    euler = EulerDiscreteScheduler()
    out, n = retrieve_timesteps(euler, sigmas=sig)
    assert n == 8 and len(euler.sigmas) == 9 and euler.sigmas[-1] == 0  # used verbatim: no extra final sigma
    torch.testing.assert_close(euler.sigmas, torch.tensor(sig, dtype=torch.float32), atol=0, rtol=0)
    assert (out.double() - torch.tensor(ts)).abs().max() < 1e-3
    with pytest.raises(StridelabError, match="sha256"):
        sigmas_for_pipeline(s, AC_SD)


# --------------------------------------------------------------------------------------------------
# k-diffusion sigmas, plain JSON


def test_k_diffusion_sigmas():
    s = karras(10, AC)
    sig = k_diffusion_sigmas(s, AC)
    assert sig.dtype == torch.float32 and sig.shape == (11,) and sig[-1] == 0
    assert (sig[1:] < sig[:-1]).all()
    expected = ((1 - AC[list(s.timesteps)]) / AC[list(s.timesteps)]).sqrt()
    torch.testing.assert_close(k_diffusion_sigmas(s, AC, dtype=torch.float64)[:-1], expected, atol=0, rtol=1e-15)
    # k-diffusion's own get_sigmas_karras over the model's range maps back to our karras schedule.
    smin, smax, rho, n = float(expected.min()), float(expected.max()), 7.0, 10
    ramp = torch.linspace(0, 1, n)
    kd = torch.cat([(smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho, torch.zeros(1)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # in range: float32 rounding at the ends is not "outside"
        assert schedule_from_sigmas(kd, AC).timesteps == s.timesteps


@pytest.mark.parametrize("abar", [AC, AC_SD], ids=["linear", "scaled_linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sigmas_round_trip_exactly(abar, dtype):
    for name in SCHEDULES:
        for n in (1, 2, 7, 50, 999, 1000):
            s = make_schedule(name, n, abar)
            back = schedule_from_sigmas(k_diffusion_sigmas(s, abar, dtype=dtype), abar)
            assert back.timesteps == s.timesteps, (name, n)
    every = Schedule(tuple(range(999, -1, -1)), 1000)
    assert schedule_from_sigmas(k_diffusion_sigmas(every, abar, dtype=dtype)[:-1], abar).timesteps == every.timesteps


def test_schedule_from_sigmas_rejects_bad_lists():
    with pytest.raises(StridelabError, match=r"sigmas\[2\] = 5 is not below sigmas\[1\] = 3"):
        schedule_from_sigmas([10.0, 3.0, 5.0, 0.0], AC)
    with pytest.raises(StridelabError, match="> 0"):
        schedule_from_sigmas([10.0, -1.0], AC)
    with pytest.raises(StridelabError, match="empty"):
        schedule_from_sigmas([0.0], AC)
    with pytest.warns(UserWarning, match="outside the model's range"):
        assert schedule_from_sigmas([1000.0, 1.0, 0.0], AC).timesteps[0] == 999


def test_plain_json(tmp_path):
    s = _exported(karras(6, AC))
    obj = to_plain_json(s, AC)
    text = json.dumps(obj, allow_nan=False)
    (tmp_path / "plain.json").write_text(text)
    back = json.loads((tmp_path / "plain.json").read_text())
    assert back["timesteps"] == list(s.timesteps) and back["nfe"] == 6 and back["num_train_timesteps"] == 1000
    assert back["alphas_cumprod"] == [AC[t].item() for t in s.timesteps]
    assert back["sigmas"] == k_diffusion_sigmas(s, AC, dtype=torch.float64).tolist()
    a, sig = torch.tensor(back["alphas_cumprod"], dtype=torch.float64), torch.tensor(back["sigmas"][:-1], dtype=torch.float64)
    torch.testing.assert_close(sig, ((1 - a) / a).sqrt(), atol=0, rtol=1e-15)
    assert Schedule.from_dict(back).timesteps == s.timesteps  # stridelab reads it back too
    with pytest.raises(StridelabError, match="sha256"):
        to_plain_json(s, AC_SD)


def test_fingerprint_is_the_exports():
    from search.export import alphas_cumprod_sha256 as export_hash

    assert alphas_cumprod_sha256(AC) == export_hash(AC) != alphas_cumprod_sha256(AC_SD)
    # A scheduler's float32 table hashes like the model's float64 copy of it (bit-equal values).
    assert alphas_cumprod_sha256(DDPMScheduler().alphas_cumprod) == alphas_cumprod_sha256(AC)
    assert check_compatible(_exported(karras(3, AC)), DDPMScheduler().alphas_cumprod).dtype == torch.float64
