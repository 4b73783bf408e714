"""The digits data set, the DDPM training loop, and the bundled DDPM in pipeline/assets/digits/ddpm."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.models.bundled import DIGITS_DDPM_DIR
from pipeline.models.digits import from_unit, load_digits_images, load_digits_labels, to_unit
from pipeline.training.ddpm import TrainConfig, ema_update, save_ddpm, train_ddpm

MAX_BYTES = 10 * 1024 * 1024


# --- data -------------------------------------------------------------------------------------


def test_splits_shapes_range_and_disjoint():
    x_all, y_all = load_digits_images("all"), load_digits_labels("all")
    x_tr, x_te = load_digits_images("train"), load_digits_images("test")
    assert x_all.shape == (1797, 1, 8, 8) and x_all.dtype == torch.float32
    assert (x_tr.shape[0], x_te.shape[0]) == (1437, 360)
    assert x_all.min() == -1.0 and x_all.max() == 1.0
    assert set(torch.unique(x_all).tolist()) == {k / 16 * 2 - 1 for k in range(17)}
    # train and test partition "all" (as multisets of (image, label) rows)
    rows = lambda x, y: sorted(map(tuple, torch.cat([x.flatten(1), y[:, None].float()], 1).tolist()))
    assert rows(x_all, y_all) == sorted(rows(x_tr, load_digits_labels("train")) + rows(x_te, load_digits_labels("test")))
    # stratified: every class has 35..37 test images
    assert load_digits_labels("test").bincount().tolist() == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]
    assert torch.equal(load_digits_images("test"), x_te)  # deterministic


def test_unit_helpers_round_trip_and_bad_split():
    x = load_digits_images("test")
    u = to_unit(x)
    assert u.min() >= 0 and u.max() <= 1
    torch.testing.assert_close(from_unit(u), x)
    with pytest.raises(ValueError, match="allowed: all, train, test"):
        load_digits_images("valid")


# --- training loop ----------------------------------------------------------------------------

TINY = dict(steps=3, batch_size=8, block_out_channels=(32,), attention_levels=0, layers_per_block=1,
            max_minutes=None, warmup_steps=1)


def test_config_validation():
    with pytest.raises(ValueError, match="norm_num_groups"):
        TrainConfig(block_out_channels=(48, 64))
    with pytest.raises(ValueError, match="split"):
        TrainConfig(split="valid")
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)
    assert TrainConfig(block_out_channels=[32, 64]).block_out_channels == (32, 64)


def test_ema_update_math():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    expect = [0.9 * pa.detach() + 0.1 * pb.detach() for pa, pb in zip(a.parameters(), b.parameters())]
    ema_update(a, b, 0.9)
    for got, want in zip(a.parameters(), expect):
        torch.testing.assert_close(got, want)


def test_train_is_seeded_and_saves_ema_weights(tmp_path):
    from diffusers import UNet2DModel

    ema, hist = train_ddpm(TrainConfig(**TINY), progress_bar=False)
    ema2, _ = train_ddpm(TrainConfig(**TINY), progress_bar=False)
    assert hist["steps"] == 3 and len(hist["loss"]) == 3
    for p, q in zip(ema.parameters(), ema2.parameters()):
        torch.testing.assert_close(p, q)  # same seed, same weights
    save_ddpm(ema, tmp_path / "m", {"weights": "EMA"})
    loaded = UNet2DModel.from_pretrained(tmp_path / "m", subfolder="unet", use_safetensors=True)
    sd_ema, sd_raw, sd_loaded = ema.state_dict(), hist["raw_unet"].state_dict(), loaded.state_dict()
    assert all(torch.equal(sd_loaded[k], sd_ema[k]) for k in sd_ema)
    assert any(not torch.equal(sd_loaded[k], sd_raw[k]) for k in sd_raw)


# --- the bundled model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unet():
    from diffusers import UNet2DModel

    return UNet2DModel.from_pretrained(DIGITS_DDPM_DIR, subfolder="unet", use_safetensors=True).eval()


def test_bundled_files_safetensors_and_small():
    names = {p.relative_to(DIGITS_DDPM_DIR).as_posix() for p in DIGITS_DDPM_DIR.rglob("*") if p.is_file()}
    assert names == {
        "model_index.json", "TRAINING.json", "scheduler/scheduler_config.json",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    }
    total = sum(p.stat().st_size for p in DIGITS_DDPM_DIR.rglob("*") if p.is_file())
    assert total <= MAX_BYTES, total


def test_bundled_scheduler_is_linear_T1000_eps():
    from diffusers import DDPMScheduler

    cfg = json.loads((DIGITS_DDPM_DIR / "scheduler" / "scheduler_config.json").read_text())
    assert (cfg["beta_schedule"], cfg["num_train_timesteps"], cfg["prediction_type"]) == ("linear", 1000, "epsilon")
    assert (cfg["beta_start"], cfg["beta_end"], cfg["clip_sample"]) == (0.0001, 0.02, False)
    sched = DDPMScheduler.from_pretrained(DIGITS_DDPM_DIR, subfolder="scheduler")
    assert sched.alphas_cumprod.shape == (1000,)
    assert sched.alphas_cumprod[-1].item() == pytest.approx(4.04e-5, rel=0.02)


def test_bundled_pipeline_loads_offline():
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(DIGITS_DDPM_DIR, use_safetensors=True)
    assert pipe.unet.config.sample_size == 8 and pipe.unet.config.in_channels == 1


def test_bundled_training_record_says_ema(unet):
    rec = json.loads((DIGITS_DDPM_DIR / "TRAINING.json").read_text())
    assert rec["weights"] == "EMA"
    assert rec["params"] == sum(p.numel() for p in unet.parameters())
    assert rec["steps"] >= 500 and rec["final_loss_smoothed"] < 0.2


def test_bundled_few_step_sample(unet):
    from diffusers import DDPMScheduler

    from pipeline.solvers.ddim import ddim_sample
    from pipeline.models.denoisers import DiffusersDenoiser
    from pipeline.core.seeds import initial_noise

    abar = DDPMScheduler.from_pretrained(DIGITS_DDPM_DIR, subfolder="scheduler").alphas_cumprod
    x_T, _ = initial_noise(range(8), (1, 8, 8))
    x0 = ddim_sample(DiffusersDenoiser(unet, abar), x_T, [999, 750, 500, 250, 0], abar)
    assert x0.shape == (8, 1, 8, 8) and torch.isfinite(x0).all()
    # A trained model lands in the data range with the data's grey level (x_T itself would not:
    # ~76% of its pixels lie in [-1.2, 1.2] and its mean is ~0); the data's mean is -0.39.
    assert (x0.abs() <= 1.2).float().mean() > 0.85
    assert abs(x0.mean().item() - load_digits_images("all").mean().item()) < 0.15
    assert x0.std() > 0.4  # and not on a constant image
