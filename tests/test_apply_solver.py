"""Reuse with the solver a schedule was tuned for: the recorded solver, `apply_schedule`'s warning when the
scheduler runs another one, `scheduler_for_schedule`, UniPC's assigned steps and ComfyUI sigma strings.
Real diffusers schedulers throughout; the solvers not yet in the registry are test-local `SolverSpec`s with
the diffusers configs the family uses."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from diffusers import (
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

from pipeline.core.noise import make_alphas_cumprod
from pipeline.core.schedules import SCHEDULES, Schedule, karras, make_schedule
from pipeline.errors import StridelabError
from pipeline.interop.apply import alphas_cumprod_sha256, apply_schedule
from pipeline.interop.reuse import recorded_solver, scheduler_for_schedule, solver_record
from pipeline.interop.sigma_lists import comfyui_sigma_string, k_diffusion_sigmas, parse_sigma_string, schedule_from_sigmas, to_plain_json
from pipeline.interop.ddim_scheduler import StrideDDIMScheduler
from pipeline.solvers.base import SolverSpec
from pipeline.solvers.registry import SOLVERS

AC = make_alphas_cumprod("linear", 1000)

_DPM = {"algorithm_type": "dpmsolver++", "final_sigmas_type": "zero", "lower_order_final": True}
FAMILY = {  # name -> SolverSpec as the family registers it (only "ddim" is registered here yet)
    "ddim": SOLVERS["ddim"],
    "euler": SolverSpec("euler", SOLVERS["ddim"].sample, 1, "Euler", diffusers_class="EulerDiscreteScheduler",
                        k_diffusion="sample_euler", comfyui="euler"),
    "heun": SolverSpec("heun", SOLVERS["ddim"].sample, 2, "Heun", evals_per_step=2,
                       diffusers_class="HeunDiscreteScheduler", k_diffusion="sample_heun", comfyui="heun"),
    "dpmsolver++2m": SolverSpec("dpmsolver++2m", SOLVERS["ddim"].sample, 2, "2M",
                                diffusers_class="DPMSolverMultistepScheduler", diffusers_config={**_DPM, "solver_order": 2},
                                k_diffusion="sample_dpmpp_2m", comfyui="dpmpp_2m", multistep=True),
    "dpmsolver++3m": SolverSpec("dpmsolver++3m", SOLVERS["ddim"].sample, 3, "3M",
                                diffusers_class="DPMSolverMultistepScheduler", diffusers_config={**_DPM, "solver_order": 3},
                                k_diffusion="sample_dpmpp_3m_sde", comfyui="dpmpp_3m_sde", multistep=True),
    "unipc": SolverSpec("unipc", SOLVERS["ddim"].sample, 2, "UniPC", diffusers_class="UniPCMultistepScheduler",
                        diffusers_config={"solver_order": 2, "solver_type": "bh2", "predict_x0": True,
                                          "final_sigmas_type": "zero"},
                        comfyui="uni_pc_bh2", multistep=True),
    "ipndm": SolverSpec("ipndm", SOLVERS["ddim"].sample, 4, "iPNDM", comfyui="ipndm", multistep=True),
}
WITH_DIFFUSERS = [n for n, s in FAMILY.items() if s.diffusers_class]


@pytest.fixture(autouse=True)
def _strict():
    """Every warning of ours is an error unless a test expects it; diffusers' numpy-2 deprecation is not ours."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", message=".*__array__ implementation doesn't accept a copy keyword.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield


def tuned(name: str, schedule: Schedule | None = None) -> Schedule:
    """A schedule as an export of a sweep with solver `name` carries it: model hash and solver record in meta."""
    s = schedule or karras(9, AC)
    meta = {"model": "m", "alphas_cumprod_sha256": alphas_cumprod_sha256(AC), "solver": FAMILY[name].record()}
    return Schedule(s.timesteps, s.num_train_timesteps, "learned", s.params, meta)


# --------------------------------------------------------------------------------------------------
# scheduler_for_schedule: exactly the recorded scheduler, its steps the schedule's


@pytest.mark.parametrize("name", WITH_DIFFUSERS)
def test_scheduler_for_schedule_builds_the_recorded_class_and_config(name):
    s = tuned(name)
    rec = FAMILY[name].record()
    # A DDPM config as a checkpoint ships it (betas written out: diffusers' from_config drops the keys a
    # scheduler left at their defaults, and HeunDiscrete's defaults are other betas): recorded keys on top.
    base = DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False).config
    sched = scheduler_for_schedule(s, base)  # silent: _strict turns a mismatch warning into a failure
    assert type(sched).__name__ == rec["diffusers_class"]
    assert {k: sched.config[k] for k in rec["diffusers_config"]} == rec["diffusers_config"]
    assert alphas_cumprod_sha256(sched.alphas_cumprod) == s.meta["alphas_cumprod_sha256"]
    if name in ("ddim", "dpmsolver++2m", "dpmsolver++3m", "unipc"):
        assert sched.timesteps.tolist() == list(s.timesteps)
    elif name == "heun":  # Heun repeats each interior step for its corrector
        assert list(dict.fromkeys(sched.timesteps.tolist())) == list(s.timesteps)
    else:  # Euler takes sigmas= verbatim and recovers the timesteps from float32 sigmas
        torch.testing.assert_close(sched.sigmas, s.sigmas(AC).float(), atol=0, rtol=0)
        assert (sched.timesteps.double() - torch.tensor(s.timesteps)).abs().max() < 1e-3
    if name in ("dpmsolver++2m", "dpmsolver++3m", "unipc"):  # sigmas from diffusers' float32 table
        torch.testing.assert_close(sched.sigmas, s.sigmas(AC).float(), atol=0, rtol=1e-6)


def test_scheduler_for_schedule_ddim_holds_the_schedule_in_its_config():
    s = tuned("ddim")
    with pytest.raises(StridelabError, match="clip_sample=False"):
        scheduler_for_schedule(s, DDPMScheduler(clip_sample=True))
    sched = scheduler_for_schedule(s, DDPMScheduler(clip_sample=True), clip_sample=False)
    assert type(sched) is StrideDDIMScheduler and sched.config.schedule_timesteps == list(s.timesteps)
    # An old file (no solver recorded) is DDIM's, as every sweep before solvers ran DDIM.
    old = Schedule(s.timesteps, 1000, "learned", {}, {"alphas_cumprod_sha256": s.meta["alphas_cumprod_sha256"]})
    assert type(scheduler_for_schedule(old, DDPMScheduler(clip_sample=False).config)) is StrideDDIMScheduler
    # The base's own values count, defaults included (DDPMScheduler's clip_sample=True; HeunDiscrete took its
    # own default betas from a DDPMScheduler() before): from_config ignores `_use_default_values` here.
    with pytest.raises(StridelabError, match="clip_sample=False"):
        scheduler_for_schedule(old, DDPMScheduler().config)
    heun = scheduler_for_schedule(tuned("heun"), DDPMScheduler())
    assert torch.equal(heun.alphas_cumprod, DDPMScheduler().alphas_cumprod)


def test_scheduler_for_schedule_refuses_a_solver_without_diffusers_scheduler():
    with pytest.raises(StridelabError, match="'ipndm'.* no diffusers scheduler; run it with ComfyUI's ipndm"):
        scheduler_for_schedule(tuned("ipndm"), DDPMScheduler().config)


def test_an_override_of_a_recorded_key_warns():
    with pytest.warns(UserWarning, match=r"tuned for dpmsolver\+\+2m .*running DPMSolverMultistepScheduler\(.*solver_order=3"):
        scheduler_for_schedule(tuned("dpmsolver++2m"), DDPMScheduler().config, solver_order=3)


# --------------------------------------------------------------------------------------------------
# apply_schedule: one line when the scheduler runs another solver


@pytest.mark.parametrize("name,other", [
    ("dpmsolver++2m", HeunDiscreteScheduler(beta_start=0.0001, beta_end=0.02)),
    ("dpmsolver++2m", UniPCMultistepScheduler()),
    ("unipc", DPMSolverMultistepScheduler(solver_order=2, algorithm_type="dpmsolver++")),
    ("heun", EulerDiscreteScheduler(timestep_spacing="leading")),
    ("ddim", DPMSolverMultistepScheduler(solver_order=2)),  # the measured 1.95x
    ("ddim", DDPMScheduler(clip_sample=False)),  # ancestral: another update
])
def test_apply_schedule_warns_for_another_class(name, other):
    rec = FAMILY[name].record()
    with pytest.warns(UserWarning) as got:
        apply_schedule(other, tuned(name), AC)
    msg = [str(w.message) for w in got if "tuned for" in str(w.message)]
    assert len(msg) == 1 and "\n" not in msg[0]
    assert f"tuned for {name} ({rec['diffusers_class']}(" in msg[0]
    assert f"running {type(other).__name__}(" in msg[0] and "results may be worse" in msg[0]


@pytest.mark.parametrize("name,key,value", [
    ("dpmsolver++2m", "solver_order", 3),
    ("dpmsolver++3m", "solver_order", 2),
    ("dpmsolver++2m", "algorithm_type", "sde-dpmsolver++"),
    ("dpmsolver++2m", "lower_order_final", False),
    ("dpmsolver++2m", "final_sigmas_type", "sigma_min"),
    ("unipc", "solver_type", "bh1"),
    ("unipc", "predict_x0", False),
])
def test_apply_schedule_warns_for_a_differing_recorded_key(name, key, value):
    rec = FAMILY[name].record()
    cfg = {**rec["diffusers_config"], key: value}
    sched = getattr(__import__("diffusers"), rec["diffusers_class"])(**cfg)
    with pytest.warns(UserWarning) as got:
        apply_schedule(sched, tuned(name), AC)
    msg = [str(w.message) for w in got if "tuned for" in str(w.message)]
    assert len(msg) == 1
    assert f"{key}={rec['diffusers_config'][key]!r}" in msg[0].split("running")[0]
    assert f"{key}={value!r}" in msg[0].split("running")[1]


@pytest.mark.parametrize("name", WITH_DIFFUSERS)
def test_apply_schedule_is_silent_for_the_matching_scheduler(name):
    rec = FAMILY[name].record()
    kw = {"beta_start": 0.0001, "beta_end": 0.02} if name == "heun" else {}
    if name == "euler":
        kw["timestep_spacing"] = "leading"
    cls = StrideDDIMScheduler if name == "ddim" else getattr(__import__("diffusers"), rec["diffusers_class"])
    apply_schedule(cls(**rec["diffusers_config"], **kw), tuned(name), AC)  # _strict: any warning fails


def test_schedulers_running_ddims_update_do_not_warn_for_ddim():
    """DDIM = Euler on the PF-ODE = DPM-Solver++ 1 (tests/test_interop.py measures them equal)."""
    s = tuned("ddim")
    apply_schedule(EulerDiscreteScheduler(timestep_spacing="leading"), s, AC)
    apply_schedule(DPMSolverMultistepScheduler(solver_order=1, algorithm_type="dpmsolver++"), s, AC)
    with pytest.warns(UserWarning) as got:  # ends at sigma_min: not DDIM's last step
        apply_schedule(DPMSolverMultistepScheduler(solver_order=1, final_sigmas_type="sigma_min"), s, AC)
    assert any("tuned for ddim" in str(w.message) for w in got)


def test_a_schedule_recording_no_solver_never_warns():
    s = Schedule(karras(9, AC).timesteps, 1000, "old", {}, {"alphas_cumprod_sha256": alphas_cumprod_sha256(AC)})
    assert recorded_solver(s) is None
    for sched in (DPMSolverMultistepScheduler(), UniPCMultistepScheduler(), StrideDDIMScheduler()):
        apply_schedule(sched, s, AC)


def test_solver_record_shapes():
    assert solver_record("ddim") == SOLVERS["ddim"].record()
    assert recorded_solver(Schedule((5, 1), 1000, meta={"solver": "ddim"}))["diffusers_class"] == "StrideDDIMScheduler"
    with pytest.raises(StridelabError, match="must be one of"):
        solver_record("nope")
    with pytest.raises(StridelabError, match="string 'name'"):
        solver_record({"order": 1})
    with pytest.raises(StridelabError, match="'diffusers_config' must be a JSON object"):
        solver_record({"name": "x", "diffusers_config": [1]})


# --------------------------------------------------------------------------------------------------
# UniPC: the exact integer timesteps, and the run its own set_timesteps would give


def test_unipc_runs_exactly_the_integer_timesteps():
    for name in SCHEDULES:
        for n in (1, 2, 7, 50):
            s = make_schedule(name, n, AC)
            u = apply_schedule(UniPCMultistepScheduler(), s, AC)
            assert u.timesteps.dtype == torch.int64 and u.timesteps.tolist() == list(s.timesteps), (name, n)
            torch.testing.assert_close(u.sigmas, s.sigmas(AC).float(), atol=0, rtol=1e-6)  # float32 table
            assert u.num_inference_steps == n
    with pytest.raises(StridelabError, match="use_karras_sigmas=True places its own steps"):
        apply_schedule(UniPCMultistepScheduler(use_karras_sigmas=True), karras(5, AC), AC)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_unipc_assigned_equals_its_own_set_timesteps(spacing, final):
    """For the steps UniPC's own spacing picks, the assigned schedule gives bit-equal timesteps, sigmas and
    samples: the assignment is what set_timesteps does, only with other steps. (Two runs on one x_T.)"""
    cfg = {"timestep_spacing": spacing, "final_sigmas_type": final}
    native = UniPCMultistepScheduler(**cfg)
    native.set_timesteps(8)
    ours = apply_schedule(UniPCMultistepScheduler(**cfg), Schedule(tuple(native.timesteps.tolist()), 1000), AC)
    assert torch.equal(native.timesteps, ours.timesteps) and torch.equal(native.sigmas, ours.sigmas)
    x_T = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    model = lambda x, t: 0.3 * x + 0.01 * float(t)  # noqa: E731  any deterministic function of (x, t)
    outs = []
    for sched in (native, ours):
        x = x_T.clone()
        for t in sched.timesteps:
            x = sched.step(model(x, t), t, x).prev_sample
        outs.append(x)
    assert torch.equal(outs[0], outs[1])


# --------------------------------------------------------------------------------------------------
# ComfyUI sigma strings, plain JSON


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_comfyui_string_parses_back_to_the_same_sigmas_and_schedule(name):
    s = make_schedule(name, 10, AC)
    sig = k_diffusion_sigmas(s, AC, dtype=torch.float64)
    text = comfyui_sigma_string(sig)
    assert text.count(",") == 10 and text.endswith(", 0") and "e" not in text.lower()
    back = parse_sigma_string(text)
    assert back == sig.tolist()  # exact float64
    assert schedule_from_sigmas(back, AC).timesteps == s.timesteps
    assert schedule_from_sigmas(torch.tensor(back, dtype=torch.float32), AC).timesteps == s.timesteps  # ComfyUI's float32


def test_comfyui_string_refuses_bad_lists():
    with pytest.raises(StridelabError, match="ending in 0"):
        comfyui_sigma_string([3.0, 1.0])
    with pytest.raises(StridelabError, match="strictly decreasing"):
        comfyui_sigma_string([3.0, 4.0, 0.0])
    with pytest.raises(StridelabError, match="entry 1 is 'x'"):
        parse_sigma_string("1.5, x, 0")


def test_plain_json_carries_the_solver_and_reads_back():
    s = tuned("dpmsolver++2m")
    obj = json.loads(json.dumps(to_plain_json(s, AC)))
    assert obj["solver"] == FAMILY["dpmsolver++2m"].record()
    back = Schedule.from_dict(obj)
    assert back.timesteps == s.timesteps and recorded_solver(back) == obj["solver"]
    assert back.meta["alphas_cumprod_sha256"] == alphas_cumprod_sha256(AC)
    assert type(scheduler_for_schedule(back, DDPMScheduler().config)).__name__ == "DPMSolverMultistepScheduler"
    assert "solver" not in to_plain_json(Schedule(s.timesteps, 1000), AC)  # nothing recorded, nothing claimed
