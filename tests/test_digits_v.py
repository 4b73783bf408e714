"""The second bundled model, ``bundled:digits-v``: the digits data and UNet of ``bundled:digits`` with cosine
betas (``squaredcos_cap_v2``) and v prediction; and the TrainConfig options that build it."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict

import pytest
import torch

from jobs.cli import main
from pipeline.errors import StridelabError
from pipeline.models.bundled import DIGITS_DDPM_DIR, DIGITS_V_DDPM_DIR
from pipeline.models.load import load_model
from pipeline.training.ddpm import TrainConfig, make_scheduler, simple_loss

MAX_BYTES = 10 * 1024 * 1024
NEW_FIELDS = ("beta_schedule", "prediction_type")

# FID (digits features, reference digits:all) of a 250-step uniform DDIM sample from seeds 0..255, as
# `stridelab evaluate --schedules uniform --nfe 250 --metrics fid` computes it. Measured 2026-12-02 on the
# 2-core CPU machine: bundled:digits 1.716, bundled:digits-v 0.569 (README). The seeds are fixed, so only a
# change of model, sampler or metric code moves these numbers. The test recomputes both and asks digits-v
# to stay within 2x of digits (the brief's bar) and below 1.5 (2.6x its measured value, still under
# digits'): a broken v->eps conversion or a misread schedule gives blobs or noise, FID far above 10.
FID_RATIO_BOUND = 2.0
FID_ABS_BOUND = 1.5


@pytest.fixture(scope="module")
def one_thread_module():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def model_v():
    return load_model("bundled:digits-v")


# --- the bundled files ----------------------------------------------------------------------------------


def test_bundled_files_safetensors_small_and_recorded():
    names = {p.relative_to(DIGITS_V_DDPM_DIR).as_posix() for p in DIGITS_V_DDPM_DIR.rglob("*") if p.is_file()}
    assert names == {
        "model_index.json", "TRAINING.json", "scheduler/scheduler_config.json",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    }
    total = sum(p.stat().st_size for p in DIGITS_V_DDPM_DIR.rglob("*") if p.is_file())
    assert total <= MAX_BYTES, total
    rec = json.loads((DIGITS_V_DDPM_DIR / "TRAINING.json").read_text())
    assert rec["command"].startswith("stridelab train digits-v ")
    assert (rec["config"]["beta_schedule"], rec["config"]["prediction_type"]) == ("squaredcos_cap_v2", "v_prediction")
    assert rec["weights"] == "EMA" and rec["steps"] >= 500 and math.isfinite(rec["final_loss_smoothed"])
    # Same data and UNet as bundled:digits: every config field but the two new ones and the run's budget.
    digits = json.loads((DIGITS_DDPM_DIR / "TRAINING.json").read_text())
    same = {k: v for k, v in digits["config"].items() if k not in ("max_minutes", "num_threads")}
    assert {k: rec["config"][k] for k in same} == same
    assert rec["params"] == digits["params"]


def test_scheduler_config_says_cosine_and_v(model_v):
    cfg = json.loads((DIGITS_V_DDPM_DIR / "scheduler" / "scheduler_config.json").read_text())
    assert (cfg["beta_schedule"], cfg["prediction_type"], cfg["num_train_timesteps"]) == ("squaredcos_cap_v2", "v_prediction", 1000)
    assert model_v.denoiser.prediction_type == "v_prediction"
    assert model_v.sample_shape == (1, 8, 8)


def test_abar_is_diffusers_cosine_and_differs_from_digits(model_v):
    from diffusers import DDPMScheduler

    want = DDPMScheduler.from_pretrained(DIGITS_V_DDPM_DIR, subfolder="scheduler").alphas_cumprod.double()
    torch.testing.assert_close(model_v.alphas_cumprod, want, rtol=1e-6, atol=1e-12)
    digits = load_model("bundled:digits").alphas_cumprod
    assert digits.shape == model_v.alphas_cumprod.shape == (1000,)
    # Mid-way the cosine schedule keeps about half the signal, the linear one under a tenth.
    assert model_v.alphas_cumprod[500] == pytest.approx(0.49, abs=0.02)
    assert digits[500] == pytest.approx(0.078, abs=0.01)
    assert (model_v.alphas_cumprod - digits).abs().max() > 0.4


def test_denoiser_converts_v_to_eps(model_v):
    unet, abar = model_v.denoiser.model, model_v.alphas_cumprod
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 8, 8, generator=gen)
    t = torch.tensor([0, 10, 250, 500, 900, 999])
    with torch.no_grad():
        v = unet(x, t).sample
    a = abar[t].float().view(-1, 1, 1, 1)
    want = a.sqrt() * v + (1.0 - a).sqrt() * x  # eps from v = sqrt(abar) eps - sqrt(1 - abar) x0
    got = model_v.denoiser(x, t)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - v).abs().max() > 0.1  # the conversion is not the identity: the raw output is not eps


def test_fid_reference_is_the_digits_one(model_v):
    from pipeline.metrics.reference import fid_inputs

    features, ref = fid_inputs(model_v)
    assert (features, ref.name) == ("digits", "digits:all")
    _, ref_digits = fid_inputs(load_model("bundled:digits"))
    assert ref is ref_digits  # one cached reference for both models


def _evaluate_fid(model: str, tmp_path) -> float:
    out = tmp_path / f"{model.replace(':', '_')}.csv"
    assert main(["evaluate", "--model", model, "--schedules", "uniform", "--nfe", "250", "--metrics", "fid",
                 "--num-seeds", "256", "--out", str(out)]) == 0
    (row,) = list(csv.DictReader(out.open()))
    return float(row["fid"])


def test_250_step_ddim_fid_is_close_to_digits(tmp_path, capsys):
    fid_v = _evaluate_fid("bundled:digits-v", tmp_path)
    fid_d = _evaluate_fid("bundled:digits", tmp_path)
    capsys.readouterr()
    assert math.isfinite(fid_v) and fid_v > 0
    assert fid_v < FID_ABS_BOUND, (fid_v, fid_d)
    assert fid_v < FID_RATIO_BOUND * fid_d, (fid_v, fid_d)


# --- TrainConfig -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, bad", [("beta_schedule", "cosine"), ("prediction_type", "sample"),
                                        ("prediction_type", "v")])
def test_train_config_rejects_bad_values_in_one_line(field, bad):
    with pytest.raises(StridelabError) as e:
        TrainConfig(**{field: bad})
    msg = str(e.value)
    assert "\n" not in msg and field in msg and repr(bad) in msg, msg


def test_default_config_is_the_digits_one():
    rec = json.loads((DIGITS_DDPM_DIR / "TRAINING.json").read_text())
    default = TrainConfig()
    assert (default.beta_schedule, default.prediction_type) == ("linear", "epsilon")
    # The config `stridelab train digits` builds from the recorded command's flags is the recorded config,
    # field for field (the two new fields are the only additions).
    assert rec["command"] == ("stridelab train digits --steps 4000 --max-minutes 24.0 --seed 0 --batch-size 128 "
                              "--lr 0.001 --threads 2")
    cfg = json.loads(json.dumps(asdict(TrainConfig(seed=0, steps=4000, batch_size=128, lr=0.001, max_minutes=24.0))))
    assert {k: v for k, v in cfg.items() if k not in NEW_FIELDS} == rec["config"]
    # ... and the default scheduler is the one saved with bundled:digits.
    saved = json.loads((DIGITS_DDPM_DIR / "scheduler" / "scheduler_config.json").read_text())
    made = {k: v for k, v in make_scheduler().config.items() if not k.startswith("_")}
    assert made == {k: v for k, v in saved.items() if not k.startswith("_")}


def test_v_loss_target():
    """simple_loss regresses v = sqrt(abar) eps - sqrt(1 - abar) x0 under v_prediction, eps by default,
    with the same draws of t and eps."""

    class Echo(torch.nn.Module):  # returns its input: the loss is then ||x_t - target||^2
        def forward(self, x, t):
            return type("Out", (), {"sample": x})()

    abar = make_scheduler("squaredcos_cap_v2", "v_prediction").alphas_cumprod.float()
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    g = lambda: torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (16,), generator=(gen := g()))
    eps = torch.randn(x0.shape, generator=gen)
    a = abar[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    torch.testing.assert_close(simple_loss(Echo(), x0, abar, g(), "v_prediction"), ((x_t - v) ** 2).mean())
    torch.testing.assert_close(simple_loss(Echo(), x0, abar, g()), ((x_t - eps) ** 2).mean())


def test_train_digits_v_cli_saves_cosine_v_pipeline(tmp_path):
    out = tmp_path / "ddpm"
    rc = main(["train", "digits-v", "--steps", "2", "--batch-size", "4", "--max-minutes", "0", "--threads", "1",
               "--out-dir", str(out)])
    assert rc == 0 and [p.name for p in tmp_path.iterdir()] == ["ddpm"]  # atomic: no temp dir left
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["beta_schedule"], sched["prediction_type"]) == ("squaredcos_cap_v2", "v_prediction")
    rec = json.loads((out / "TRAINING.json").read_text())
    assert rec["command"].startswith("stridelab train digits-v --steps 2 ")
    assert rec["steps"] == 2 and rec["config"]["prediction_type"] == "v_prediction"
    assert load_model(str(out)).denoiser.prediction_type == "v_prediction"
