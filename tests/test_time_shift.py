"""A schedule's per-step model time shift (``meta.model_log_sigma_shift``) run everywhere it is consumed: our
evaluators (in-process and on Ray actors), `StrideDDIMScheduler` in a real diffusers pipeline on the bundled
digits UNet (eps and v-prediction), and `sample_with_schedule`; bad shifts are one line."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, UNet2DModel

from pipeline.core.schedules import MODEL_SHIFT_KEY, Schedule
from pipeline.core.seeds import initial_noise
from pipeline.errors import StridelabError
from pipeline.evaluation.gradient import sample_with_shift
from pipeline.evaluation.inprocess import InProcessEvaluator
from pipeline.interop.apply import alphas_cumprod_sha256
from pipeline.interop.ddim_scheduler import StrideDDIMScheduler
from pipeline.interop.pipelines import sample_with_schedule
from pipeline.interop.sigma_lists import k_diffusion_sigmas
from pipeline.models.bundled import ASSETS_DIR
from pipeline.models.load import load_model
from pipeline.solvers.registry import SOLVERS

STEPS = [935, 841, 753, 652, 534, 398, 277, 186, 98, 31]
SHIFT = [0.2, 0.44, -0.06, 0.53, -0.12, -0.3, 0.01, -0.02, -0.04, -0.1]


def _shifted(shift=SHIFT, steps=STEPS) -> Schedule:
    return Schedule(steps, 1000, "learned", meta={MODEL_SHIFT_KEY: list(shift)})


def test_the_shift_is_validated_and_all_zeros_is_no_shift():
    assert _shifted().model_shift == tuple(SHIFT)
    assert _shifted([0.0] * len(STEPS)).model_shift is None
    assert Schedule.from_json(_shifted().to_json()).model_shift == tuple(SHIFT)
    for bad in ([0.1] * 3, [float("nan")] * len(STEPS), "0.1", [True] * len(STEPS)):
        with pytest.raises(StridelabError, match=MODEL_SHIFT_KEY):
            _shifted(bad)


@pytest.fixture(scope="module")
def ring8():
    return load_model("gmm:ring8")


def test_in_process_evaluation_samples_with_the_shift(ring8):
    seeds = list(range(12))
    ev = InProcessEvaluator(ring8, seeds, teacher_nfe=40)
    steps, shift = [900, 600, 300, 100], [0.3, -0.2, 0.1, 0.4]
    plain, shifted, zero = ev.evaluate([Schedule(steps, 1000), _shifted(shift, steps), _shifted([0.0] * 4, steps)])
    x_T = initial_noise(seeds, ring8.sample_shape)[0]
    want = sample_with_shift(ring8.denoiser, x_T, steps, shift, ring8.alphas_cumprod)
    got_rec = ((ring8.to_unit(want) - ring8.to_unit(ev.teacher.x0)) ** 2).flatten(1).mean(1)
    assert shifted.recon.double().tolist() == pytest.approx(got_rec.double().tolist(), rel=1e-6)
    assert not torch.allclose(shifted.recon, plain.recon)
    assert torch.equal(zero.recon, plain.recon)


@pytest.mark.slow
def test_ray_actors_evaluate_the_shift_as_in_process(ring8, ray_local):  # ray_local: conftest.py
    from pipeline.distributed import SamplerPool

    seeds, steps, shift = list(range(6)), [900, 600, 300, 100], [0.3, -0.2, 0.1, 0.4]
    pool = SamplerPool("gmm:ring8", seeds, 20, actors=2, num_cpus=0.5)
    try:
        got = pool.evaluate([Schedule(steps, 1000), _shifted(shift, steps)])
    finally:
        pool.close()
    want = InProcessEvaluator(ring8, seeds, teacher_nfe=20).evaluate([Schedule(steps, 1000), _shifted(shift, steps)])
    for g, w in zip(got, want):
        assert g.recon.double().tolist() == pytest.approx(w.recon.double().tolist(), rel=1e-6)
    assert got[0].recon.tolist() != got[1].recon.tolist()


# ---- diffusers ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["digits", "digits-v"])
def test_stride_scheduler_in_a_ddpm_pipeline_equals_our_shifted_ddim(target):
    """The real bundled UNet in DDPMPipeline with `StrideDDIMScheduler.from_schedule`: the network sees the
    shifted, fractional timesteps, and the images equal stridelab's own shifted DDIM from the same noise."""
    m = load_model(f"bundled:{target}")
    unet = UNet2DModel.from_pretrained(ASSETS_DIR / target / "ddpm" / "unet")
    stride = StrideDDIMScheduler.from_pretrained(ASSETS_DIR / target / "ddpm" / "scheduler")
    sched = _shifted()
    pipe = DDPMPipeline(unet=unet, scheduler=StrideDDIMScheduler.from_schedule(sched, stride.config))
    pipe.set_progress_bar_config(disable=True)
    seen: list[float] = []
    hook = unet.register_forward_pre_hook(lambda mod, args: seen.append(float(args[1])))
    x_T = initial_noise([0, 1, 2], m.sample_shape)[0]
    try:
        # DDPMPipeline draws x_T itself: make it draw ours (one generator per sample would do the same)
        out = _run_from(pipe, x_T)
    finally:
        hook.remove()
    want = sample_with_shift(m.denoiser, x_T, STEPS, SHIFT, m.alphas_cumprod)
    assert seen != [float(t) for t in STEPS] and any(s != int(s) for s in seen)
    assert torch.allclose(out, want.float(), atol=1e-4), (out - want).abs().max()


def _run_from(pipe: DDPMPipeline, x_T: torch.Tensor) -> torch.Tensor:
    """DDPMPipeline's own loop (unet(x, t), scheduler.step(out, t, x)) from a given x_T; output in [-1, 1]."""
    pipe.scheduler.set_timesteps()
    x = x_T.clone()
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            x = pipe.scheduler.step(pipe.unet(x, t).sample, t, x).prev_sample
    return x


def test_sample_with_schedule_checks_the_shifted_timesteps_and_other_schedulers_warn():
    unet = UNet2DModel.from_pretrained(ASSETS_DIR / "digits" / "ddpm" / "unet")
    stride = StrideDDIMScheduler.from_pretrained(ASSETS_DIR / "digits" / "ddpm" / "scheduler")
    pipe = DDPMPipeline(unet=unet, scheduler=stride)
    pipe.set_progress_bar_config(disable=True)
    seen: list[float] = []
    hook = unet.register_forward_pre_hook(lambda mod, args: seen.append(float(args[1])))
    try:
        sample_with_schedule(pipe, _shifted(), generator=torch.manual_seed(0), batch_size=1, output_type="np")
    finally:
        hook.remove()
    want = StrideDDIMScheduler.from_schedule(_shifted(), stride.config)
    want.set_timesteps()
    assert seen == pytest.approx(want.timesteps.tolist(), abs=1e-6)
    two_m = Schedule(STEPS, 1000, "learned", meta={MODEL_SHIFT_KEY: SHIFT, "solver": SOLVERS["dpmsolver++2m"].record()})
    with pytest.warns(UserWarning, match="model time shift .* is dropped: DPMSolverMultistepScheduler"):
        sample_with_schedule(pipe, two_m, generator=torch.manual_seed(0), batch_size=1, output_type="np")
    with pytest.warns(UserWarning, match="model time shift .* is dropped: a sigma list"):
        k_diffusion_sigmas(_shifted(), stride.alphas_cumprod)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a plain schedule warns of nothing
        k_diffusion_sigmas(Schedule(STEPS, 1000, meta={"alphas_cumprod_sha256": alphas_cumprod_sha256(stride.alphas_cumprod)}),
                           stride.alphas_cumprod)


def test_the_shift_belongs_to_its_schedule():
    with pytest.raises(StridelabError, match="needs schedule_timesteps"):
        StrideDDIMScheduler(model_log_sigma_shift=SHIFT)
    s = StrideDDIMScheduler.from_schedule(_shifted())
    with pytest.raises(StridelabError, match="model time shift for its schedule"):
        s.set_timesteps(timesteps=[900, 500, 100])
    s.set_timesteps()
    with pytest.raises(StridelabError, match="shifted"):
        s.step(torch.zeros(1, 1, 8, 8), 935, torch.zeros(1, 1, 8, 8))  # the unshifted time is not one it runs
    with pytest.raises(StridelabError, match=MODEL_SHIFT_KEY):
        StrideDDIMScheduler(schedule_timesteps=STEPS, model_log_sigma_shift=[0.1])


# ---- the sweep ---------------------------------------------------------------------------------------------

GMM_SWEEP = ["sweep", "--model", "gmm:ring8", "--nfe", "5", "--trials", "12", "--num-seeds", "32", "--holdout-seeds", "32",
             "--validation-seeds", "16", "--teacher-nfe", "40", "--shift-iters", "10", "--actors", "0", "--no-mlflow",
             "--no-holdout-fid"]


def _study(out):
    import optuna

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / "optuna.journal")))
    (name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage)


def test_sweep_time_shift_adds_a_trial_exports_the_shift_and_shows_the_unshifted_row(tmp_path, capsys):
    from jobs.cli import main

    out = tmp_path / "sweep"
    assert main([*GMM_SWEEP, "--time-shift", "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    trials = _study(out).trials
    (shift,) = [t for t in trials if t.user_attrs.get("kind") == "shift"]
    parent = trials[shift.user_attrs["shift_from"]]
    assert shift.state.name == "COMPLETE" and len(trials) == 13 and parent.user_attrs.get("kind") != "shift"
    # --shift-iters Adam steps (the losses list has the final evaluation too); the kept iterate is the lowest
    losses = shift.user_attrs["gradient_losses"]
    assert len(losses) == 11 and min(losses) < losses[0]
    # on the gmm the shift wins on validation by far: it is exported, with the shift in its meta
    (study_dir,) = [p for p in out.iterdir() if p.is_dir()]
    exported = Schedule.load(study_dir / "best_schedule.json")
    assert exported.model_shift == pytest.approx(shift.user_attrs[MODEL_SHIFT_KEY])
    assert list(exported.timesteps) == shift.user_attrs["timesteps"]
    assert "learned (unshifted)" in printed and "asks the network at shifted levels" in printed
    # the trial's value is what the evaluator gives the shifted schedule on the tuning seeds
    m = load_model("gmm:ring8")
    ev = InProcessEvaluator(m, list(range(32)), teacher_nfe=40)
    (res,) = ev.evaluate([exported])
    assert float(res.recon.double().mean()) == pytest.approx(shift.value, rel=1e-6)
    # `stridelab export` from the study carries the shift; a sigma list says in one line that it drops it
    name = _study(out).study_name
    capsys.readouterr()
    journal = str(out / "optuna.journal")
    assert main(["export", "--study-name", name, "--storage", journal, "--out", str(tmp_path / "s.json")]) == 0
    assert Schedule.load(tmp_path / "s.json").model_shift == exported.model_shift
    # the real command (pytest would record the warning instead of printing it)
    run = subprocess.run([sys.executable, "-m", "jobs.cli", "export", "--study-name", name, "--storage", journal,
                          "--format", "comfyui", "--out", str(tmp_path / "c.json")], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    err = run.stderr.strip().splitlines()
    assert run.returncode == 0 and (tmp_path / "c.json").is_file()
    assert len(err) == 1 and err[0].startswith("stridelab export: warning: the schedule's model time shift"), err
    # a resume finds the shift trial and does not learn it again
    assert main([*GMM_SWEEP, "--time-shift", "--out-dir", str(out), "--resume", "--study-name", name]) == 0
    assert len(_study(out).trials) == 13


def test_sweep_time_shift_on_mini_batches_tracks_both_curves(tmp_path, capsys):
    # --shift-batch: steps 1..9 differentiate 8 of the 32 tuning seeds, steps 0 and 10 all of them; MLflow gets the
    # all-seed loss as shift_loss and the batches' as shift_loss_batch, and the trial records which is which
    from mlflow import MlflowClient

    from jobs.cli import main

    out, db = tmp_path / "sweep", f"sqlite:///{tmp_path / 'mlflow.db'}"
    flags = [a for a in GMM_SWEEP if a != "--no-mlflow"]
    assert main([*flags, "--time-shift", "--shift-batch", "8", "--tracking-uri", db, "--out-dir", str(out)]) == 0
    (shift,) = [t for t in _study(out).trials if t.user_attrs.get("kind") == "shift"]
    assert shift.state.name == "COMPLETE" and shift.user_attrs["gradient_full_iterations"] == [0, 10]
    assert len(shift.user_attrs["gradient_losses"]) == 11
    client = MlflowClient(db)
    (run,) = client.search_runs([client.get_experiment_by_name("stridelab-sweep").experiment_id],
                                "tags.`stridelab.kind` = 'sweep'")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "shift_loss")] == [0, 10]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "shift_loss_batch")) == list(range(1, 10))


@pytest.mark.parametrize("flags, message", [(["--solver", "unipc"], "--time-shift is learned by gradient through ddim, dpmsolver++2m, dpmsolver++3m only, not unipc"),
                                            (["--objective", "fid"], "--time-shift lowers the recon of sampling (--objective recon) or the DDIM round trip (--objective inversion), got --objective fid"),
                                            (["--objective", "inversion", "--grad-loss", "features"], "learns on the round trip's MSE"),
                                            (["--objective", "inversion", "--inversion-pair", "joint"], "--inversion-pair joint gives the encoder other steps: choose one"),
                                            (["--shift-iters", "0"], "--shift-iters must be an integer >= 1, got 0"),
                                            (["--shift-batch", "-8"], "--shift-batch must be an integer >= 0 (0: all the tuning seeds), got -8"),
                                            (["--shift-lr-decay", "cosine", "--grad-lr", "0"], "--grad-lr")])
def test_sweep_time_shift_bad_input_is_one_line(tmp_path, capsys, flags, message):
    from jobs.cli import main

    out = tmp_path / "sweep"
    assert main([*GMM_SWEEP, "--time-shift", *flags, "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()
