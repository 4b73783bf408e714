"""The DDIM round trip's learned model time shifts (encoder and decoder): the schedule field, the shifted round
trip, its gradient, the descent, the data-parallel gradient on Ray actors, and the sweep stage
(``--objective inversion --time-shift``)."""

from __future__ import annotations

import pytest
import torch

from pipeline.core.schedules import INVERSE_MODEL_SHIFT_KEY, MODEL_SHIFT_KEY, Schedule
from pipeline.errors import StridelabError
from pipeline.evaluation.gradient import round_trip_loss_and_grad
from pipeline.evaluation.inprocess import shifted_round_trip as round_trip
from pipeline.models.load import load_model
from search.placement.gradient import GradientConfig
from search.placement.inversion_shift import learn_inversion_shift, local_round_trip_grad_fn, pool_round_trip_grad_fn

GMM = "gmm:ring8"
STEPS = (999, 700, 420, 200, 60)


@pytest.fixture(scope="module")
def gmm():
    return load_model(GMM)


def images(m, n=8, start=0):
    return m.denoiser.sample_data(list(range(start, start + n))).to(torch.float64)


def test_schedule_carries_the_encoders_shift_and_checks_its_length():
    enc = [0.1, -0.2, 0.0, 0.3, 0.05]
    s = Schedule(STEPS, 1000, meta={INVERSE_MODEL_SHIFT_KEY: enc, MODEL_SHIFT_KEY: [0.0] * 5})
    assert s.inverse_model_shift == tuple(enc) and s.model_shift is None  # all-zero: no shift
    again = Schedule.from_dict(s.to_dict())
    assert again.inverse_model_shift == tuple(enc)
    # the encoder's shift is one per step of the encoder's own list, which may be longer than the decoder's
    own = Schedule(STEPS, 1000, meta={INVERSE_MODEL_SHIFT_KEY: [0.1] * 7},
                   inverse_timesteps=(10, 60, 130, 200, 420, 700, 999))
    assert len(own.inverse_model_shift) == 7
    with pytest.raises(StridelabError, match=f"{INVERSE_MODEL_SHIFT_KEY} must be a list of 7 finite"):
        Schedule(STEPS, 1000, meta={INVERSE_MODEL_SHIFT_KEY: [0.1] * 5}, inverse_timesteps=own.inverse_timesteps)
    with pytest.raises(StridelabError, match="finite"):
        Schedule(STEPS, 1000, meta={INVERSE_MODEL_SHIFT_KEY: [0.1, float("nan"), 0, 0, 0]})


@pytest.mark.parametrize("spec", [GMM, "bundled:digits"])
def test_zero_shifts_are_the_plain_round_trip_and_a_shift_changes_it(spec):
    m = load_model(spec)
    m.denoiser.double()
    x0 = images(m, 3) if spec == GMM else m.denoiser.sample_data([0, 1, 2]).to(torch.float64)
    ref = round_trip(m.denoiser, x0, STEPS[::-1], STEPS, m.alphas_cumprod, m.to_unit)
    zero = round_trip(m.denoiser, x0, STEPS[::-1], STEPS, m.alphas_cumprod, m.to_unit, [0.0] * 5, [0.0] * 5)
    assert ref.errors.max() > 0
    assert torch.allclose(zero.x_rec, ref.x_rec, rtol=0, atol=1e-6)
    assert torch.allclose(zero.errors, ref.errors, rtol=1e-4, atol=1e-12)
    moved = round_trip(m.denoiser, x0, STEPS[::-1], STEPS, m.alphas_cumprod, m.to_unit, [0.3] * 5, None)
    assert not torch.allclose(moved.x_T, ref.x_T, atol=1e-4)
    with pytest.raises(StridelabError, match="encode_shift has 4 entries for 5 steps"):
        round_trip(m.denoiser, x0, STEPS[::-1], STEPS, m.alphas_cumprod, m.to_unit, [0.0] * 4, None)


def test_round_trip_gradient_matches_finite_differences_and_the_round_trip(gmm):
    x0 = images(gmm)
    enc, dec = list(STEPS[::-1]), list(STEPS)
    shifts = torch.tensor([0.2, -0.1, 0.05, 0.3, -0.2, 0.1, 0.0, -0.3, 0.15, 0.25], dtype=torch.float64)
    loss, g, none = round_trip_loss_and_grad(gmm.denoiser, x0, enc, dec, shifts, gmm.alphas_cumprod)
    assert none is None and g.shape == (10,) and g.abs().max() > 0
    # the loss is the shifted round trip's per-image MSE on [0, 1], summed
    rt = round_trip(gmm.denoiser, x0, enc, dec, gmm.alphas_cumprod, gmm.to_unit, shifts[:5].tolist(), shifts[5:].tolist())
    assert loss == pytest.approx(float(rt.errors.sum()), rel=1e-9)
    h = 1e-6
    for k in (0, 4, 6, 9):
        e = torch.zeros(10, dtype=torch.float64)
        e[k] = h
        up = round_trip_loss_and_grad(gmm.denoiser, x0, enc, dec, shifts + e, gmm.alphas_cumprod)[0]
        down = round_trip_loss_and_grad(gmm.denoiser, x0, enc, dec, shifts - e, gmm.alphas_cumprod)[0]
        assert float(g[k]) == pytest.approx((up - down) / (2 * h), rel=1e-4, abs=1e-10)
    with pytest.raises(StridelabError, match="5 \\+ 5 entries"):
        round_trip_loss_and_grad(gmm.denoiser, x0, enc, dec, shifts[:9], gmm.alphas_cumprod)


def test_learned_shifts_lower_the_tuning_loss_and_go_in_meta(gmm):
    s = Schedule(STEPS, 1000, "learned", {"space": "x"}, {"note": 1})
    fn = local_round_trip_grad_fn(gmm, images(gmm, 16), s, dtype=torch.float64)
    seen = []
    r = learn_inversion_shift(fn, s, GradientConfig(iters=15, lr=0.05, lr_decay="cosine"), num_seeds=16,
                              callback=lambda it, loss, full: seen.append((it, loss, full)))
    assert len(r.losses) == 16 and [v[0] for v in seen] == list(range(16))
    assert r.losses[r.best_iteration] < 0.8 * r.losses[0]
    learned = r.schedule
    assert learned.timesteps == STEPS and learned.name == "learned" and learned.meta["note"] == 1
    assert learned.inverse_model_shift == tuple(r.shifts[:5].tolist())
    assert learned.model_shift == tuple(r.shifts[5:].tolist())
    assert learned.meta["shift_tuning_inversion"] == pytest.approx(r.losses[r.best_iteration])
    # the held-out images' round trip (never tuned on) is lower too
    held = images(gmm, 64, start=1000)
    plain = round_trip(gmm.denoiser, held, STEPS[::-1], STEPS, gmm.alphas_cumprod, gmm.to_unit).errors.mean()
    shifted = round_trip(gmm.denoiser, held, STEPS[::-1], STEPS, gmm.alphas_cumprod, gmm.to_unit,
                         learned.inverse_model_shift, learned.model_shift).errors.mean()
    assert shifted < 0.9 * plain


def test_mini_batches_keep_the_best_all_image_iterate(gmm):
    s = Schedule(STEPS, 1000)
    fn = local_round_trip_grad_fn(gmm, images(gmm, 16), s, dtype=torch.float64)
    r = learn_inversion_shift(fn, s, GradientConfig(iters=12, lr=0.05, batch_seeds=4, full_every=4), num_seeds=16)
    assert r.full_iterations == (0, 4, 8, 12) and r.best_iteration in r.full_iterations
    assert r.losses[r.best_iteration] == min(r.losses[i] for i in r.full_iterations)


def test_pool_round_trip_gradient_equals_in_process(ray_local, gmm):
    from pipeline.distributed.pool import SamplerPool

    seeds = list(range(8))
    s = Schedule(STEPS, 1000)
    shifts = torch.tensor([0.2, -0.1, 0.05, 0.3, -0.2, 0.1, 0.0, -0.3, 0.15, 0.25], dtype=torch.float64)
    data = gmm.denoiser.sample_data(seeds)
    loss, g, _ = local_round_trip_grad_fn(gmm, data, s, dtype=torch.float64)(shifts, None)
    rows = torch.tensor([1, 2, 5, 7])
    bl, bg, _ = local_round_trip_grad_fn(gmm, data, s, dtype=torch.float64)(shifts, None, rows=rows)
    with SamplerPool(GMM, seeds[:3], 50, actors=1, num_cpus=0.5, inversion=True) as a, \
            SamplerPool(GMM, seeds[3:], 50, actors=2, num_cpus=0.5, inversion=True) as b:
        fn = pool_round_trip_grad_fn([a, b], s, dtype="float64")
        ploss, pg, _ = fn(shifts, None)
        pbl, pbg, _ = fn(shifts, None, rows=rows)
        assert fn.strata == [(0, 3), (3, 5), (5, 8)] and fn.groups == [(0, 3), (3, 8)]
    assert ploss == pytest.approx(loss, rel=1e-12) and torch.allclose(pg, g, rtol=1e-10, atol=1e-14)
    assert pbl == pytest.approx(bl, rel=1e-12) and torch.allclose(pbg, bg, rtol=1e-10, atol=1e-14)


def test_a_pool_without_images_says_so(ray_local):
    from pipeline.distributed.pool import SamplerPool

    with SamplerPool(GMM, [0, 1], 50, actors=1, num_cpus=0.5) as pool:
        with pytest.raises(StridelabError, match="inversion=True"):
            pool.submit_round_trip_gradient(torch.zeros(10), STEPS[::-1], STEPS)


@pytest.mark.parametrize("target", ["digits", "digits-v"])
def test_inverse_scheduler_runs_the_encoders_shift_on_the_real_unet(target, tmp_path):
    """The bundled UNet (eps and v-prediction) driven by `StrideDDIMInverseScheduler.from_schedule` and then
    `StrideDDIMScheduler.from_schedule`, the loops diffusers' inversion pipelines run: the network is called at the
    shifted fractional labels both ways, and the code and the reconstruction equal stridelab's shifted round trip."""
    from diffusers import UNet2DModel

    from pipeline.interop.ddim_inverse_scheduler import StrideDDIMInverseScheduler
    from pipeline.interop.ddim_scheduler import StrideDDIMScheduler
    from pipeline.models.bundled import ASSETS_DIR

    m = load_model(f"bundled:{target}")
    unet = UNet2DModel.from_pretrained(ASSETS_DIR / target / "ddpm" / "unet")
    config = StrideDDIMScheduler.from_pretrained(ASSETS_DIR / target / "ddpm" / "scheduler").config
    enc, dec = [0.3, -0.2, 0.1, 0.4, 0.0], [0.0, -0.3, 0.2, 0.1, -0.4]
    s = Schedule(STEPS, 1000, "learned", meta={INVERSE_MODEL_SHIFT_KEY: enc, MODEL_SHIFT_KEY: dec})
    inverse = StrideDDIMInverseScheduler.from_schedule(s, config)
    # saved and loaded with its list and its shift
    inverse.save_pretrained(tmp_path / "inv")
    inverse = StrideDDIMInverseScheduler.from_pretrained(tmp_path / "inv")
    assert list(inverse.config.model_log_sigma_shift) == enc
    forward = StrideDDIMScheduler.from_schedule(s, config)
    x0 = m.denoiser.sample_data([0, 1, 2]).float()
    seen: list[float] = []
    hook = unet.register_forward_pre_hook(lambda mod, args: seen.append(float(args[1])))
    try:
        with torch.no_grad():
            inverse.set_timesteps()
            x = x0.clone()
            for t in inverse.timesteps:
                x = inverse.step(unet(x, t).sample, t, x).prev_sample
            code = x.clone()
            forward.set_timesteps()
            for t in forward.timesteps:
                x = forward.step(unet(x, t).sample, t, x).prev_sample
    finally:
        hook.remove()
    assert any(v != int(v) for v in seen[:5]) and [int(v) for v in inverse._steps] == list(STEPS[::-1])
    want = round_trip(m.denoiser, x0, STEPS[::-1], STEPS, m.alphas_cumprod, m.to_unit, enc, dec)
    assert torch.allclose(code, want.x_T.float(), atol=1e-4), (code - want.x_T).abs().max()
    # float32 both ways; the decoder converts v to eps in float64 (StrideDDIMScheduler), stridelab's in float32
    assert torch.allclose(x, want.x_rec.float(), atol=1e-3), (x - want.x_rec).abs().max()
    # without the shift the code differs: the scheduler does run it
    plain = StrideDDIMInverseScheduler.from_schedule(Schedule(STEPS, 1000), config)
    plain.set_timesteps()
    with torch.no_grad():
        y = x0.clone()
        for t in plain.timesteps:
            y = plain.step(unet(y, t).sample, t, y).prev_sample
    assert not torch.allclose(y, code, atol=1e-3)


def test_inverse_scheduler_shift_errors_are_one_line():
    from pipeline.interop.ddim_inverse_scheduler import StrideDDIMInverseScheduler

    with pytest.raises(StridelabError, match="model_log_sigma_shift needs inverse_timesteps"):
        StrideDDIMInverseScheduler(model_log_sigma_shift=[0.1] * 5)
    with pytest.raises(StridelabError, match="must be a list of 5 finite numbers"):
        StrideDDIMInverseScheduler(inverse_timesteps=list(STEPS[::-1]), model_log_sigma_shift=[0.1] * 4)
    s = StrideDDIMInverseScheduler(inverse_timesteps=list(STEPS[::-1]), model_log_sigma_shift=[0.1] * 5)
    with pytest.raises(StridelabError, match="would run other steps"):
        s.set_timesteps(timesteps=[10, 200, 999])
    s.set_timesteps()
    with pytest.raises(StridelabError, match="is not one of this scheduler's \\(shifted\\) timesteps"):
        s.step(torch.zeros(1, 2), 60, torch.zeros(1, 2))


SWEEP = ["sweep", "--model", GMM, "--nfe", "5", "--trials", "12", "--num-seeds", "32", "--holdout-seeds", "32",
         "--validation-seeds", "16", "--teacher-nfe", "40", "--shift-iters", "12", "--no-holdout-fid", "--no-progress",
         "--objective", "inversion", "--time-shift"]


def _study(out):
    import optuna

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / "optuna.journal")))
    (name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage)


def test_sweep_learns_the_round_trips_shifts_exports_both_and_resumes(tmp_path, capsys):
    from jobs.cli import main
    from pipeline.evaluation.inprocess import InProcessEvaluator
    from pipeline.interop.ddim_inverse_scheduler import StrideDDIMInverseScheduler

    out = tmp_path / "sweep"
    assert main([*SWEEP, "--actors", "0", "--no-mlflow", "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    study = _study(out)
    (shift,) = [t for t in study.trials if t.user_attrs.get("kind") == "shift"]
    parent = study.trials[shift.user_attrs["shift_from"]]
    assert shift.state.name == "COMPLETE" and shift.user_attrs["timesteps"] == parent.user_attrs["timesteps"]
    losses = shift.user_attrs["gradient_losses"]
    assert len(losses) == 13 and min(losses) < 0.9 * losses[0] and shift.value < parent.value
    assert "tuning round trip" in printed and "encoder asks the network at shifted levels" in printed
    # the gmm round trip gains by far: exported, with both shifts, and the encoder's runs in the inverse scheduler
    (study_dir,) = [p for p in out.iterdir() if p.is_dir()]
    exported = Schedule.load(study_dir / "best_schedule.json")
    assert exported.inverse_model_shift == pytest.approx(shift.user_attrs[INVERSE_MODEL_SHIFT_KEY])
    assert exported.model_shift == pytest.approx(shift.user_attrs[MODEL_SHIFT_KEY])
    inv = StrideDDIMInverseScheduler.from_schedule(exported)
    assert list(inv.config.model_log_sigma_shift) == pytest.approx(list(exported.inverse_model_shift))
    # the trial's value is the shifted round trip on the tuning images, as the in-process evaluator scores it
    m = load_model(GMM)
    (res,) = InProcessEvaluator(m, list(range(32)), teacher_nfe=40, inversion=True).evaluate([exported])
    assert float(res.inversion.double().mean()) == pytest.approx(shift.value, rel=1e-6)
    # the held-out table has the row it started from, unshifted
    assert "learned (unshifted)" in printed
    # a resume finds the shift trial and does not learn it again
    assert main([*SWEEP, "--actors", "0", "--no-mlflow", "--out-dir", str(out), "--resume",
                 "--study-name", study.study_name]) == 0
    assert len([t for t in _study(out).trials if t.user_attrs.get("kind") == "shift"]) == 1


def test_sweep_on_actor_pools_learns_the_in_process_shifts_and_tracks_both_curves(ray_local, tmp_path):
    # each actor differentiates the round trip on its own images: all-image steps give the in-process shifts.
    # With --shift-batch the batches split over the actors; MLflow gets the all-image and the batch curves.
    from mlflow import MlflowClient

    from jobs.cli import main

    assert main([*SWEEP, "--actors", "2", "--no-mlflow", "--shift-batch", "0", "--out-dir", str(tmp_path / "ray")]) == 0
    assert main([*SWEEP, "--actors", "0", "--no-mlflow", "--shift-batch", "0", "--out-dir", str(tmp_path / "local")]) == 0
    (a,) = [t for t in _study(tmp_path / "ray").trials if t.user_attrs.get("kind") == "shift"]
    (b,) = [t for t in _study(tmp_path / "local").trials if t.user_attrs.get("kind") == "shift"]
    assert a.user_attrs["gradient_full_iterations"] == list(range(13))
    for key in (INVERSE_MODEL_SHIFT_KEY, MODEL_SHIFT_KEY):
        assert a.user_attrs[key] == pytest.approx(b.user_attrs[key], rel=1e-4, abs=1e-6)
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main([*SWEEP, "--actors", "2", "--shift-batch", "8", "--tracking-uri", db,
                 "--out-dir", str(tmp_path / "batch")]) == 0
    (c,) = [t for t in _study(tmp_path / "batch").trials if t.user_attrs.get("kind") == "shift"]
    assert c.user_attrs["gradient_full_iterations"] == [0, 12]
    client = MlflowClient(db)
    (run,) = client.search_runs([client.get_experiment_by_name("stridelab-sweep").experiment_id],
                                "tags.`stridelab.kind` = 'sweep'")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "shift_loss")] == [0, 12]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "shift_loss_batch")) == list(range(1, 12))


def test_encoder_only_keeps_the_decoder_plain(gmm):
    s = Schedule(STEPS, 1000, meta={MODEL_SHIFT_KEY: [0.5] * 5})  # a decoder shift it had is not kept either
    fn = local_round_trip_grad_fn(gmm, images(gmm, 16), s, dtype=torch.float64)
    r = learn_inversion_shift(fn, s, GradientConfig(iters=10, lr=0.05), num_seeds=16, sides="encoder")
    assert torch.equal(r.shifts[5:], torch.zeros(5, dtype=torch.float64)) and r.shifts[:5].abs().max() > 0
    assert r.losses[r.best_iteration] < r.losses[0]
    assert r.schedule.model_shift is None and MODEL_SHIFT_KEY not in r.schedule.meta
    assert r.schedule.inverse_model_shift == tuple(r.shifts[:5].tolist())
    with pytest.raises(StridelabError, match="unknown shift sides 'decoder'"):
        learn_inversion_shift(fn, s, GradientConfig(iters=1), num_seeds=16, sides="decoder")


def test_sweep_shift_sides_encoder_exports_a_plain_decoder(tmp_path, capsys):
    from jobs.cli import main

    out = tmp_path / "sweep"
    assert main([*SWEEP, "--actors", "0", "--no-mlflow", "--shift-sides", "encoder", "--out-dir", str(out)]) == 0
    assert "decoder plain (shift_sides encoder)" in capsys.readouterr().out
    (shift,) = [t for t in _study(out).trials if t.user_attrs.get("kind") == "shift"]
    assert MODEL_SHIFT_KEY not in shift.user_attrs and len(shift.user_attrs[INVERSE_MODEL_SHIFT_KEY]) == 5
    # without --time-shift (or with another objective) the flag has nothing to choose: one line, exit 2
    flags = [a for a in SWEEP if a != "--time-shift"]
    assert main([*flags, "--actors", "0", "--no-mlflow", "--shift-sides", "encoder", "--out-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--shift-sides encoder chooses" in err[0] and "--time-shift" in err[0], err
