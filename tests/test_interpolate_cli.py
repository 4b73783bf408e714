"""`stridelab interpolate` on the bundled digits model, and the pure pieces under it (slerp, smoothness)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from jobs.cli import main
from pipeline.core.interpolation import slerp, slerp_path
from pipeline.core.schedules import uniform
from pipeline.core.seeds import initial_noise
from pipeline.errors import StridelabError
from pipeline.metrics.fid import make_feature_fn
from pipeline.metrics.smoothness import path_smoothness
from pipeline.models.load import load_model
from pipeline.solvers.ddim import ddim_sample


# --------------------------------------------------------------------------------------------------
# Pure pieces


def test_slerp_keeps_the_ends_and_the_sphere():
    a, b = initial_noise([1, 2], (1, 8, 8))[0]
    path = slerp(a, b, torch.linspace(0, 1, 9, dtype=torch.float64))
    torch.testing.assert_close(path[0], a, atol=1e-6, rtol=0)
    torch.testing.assert_close(path[-1], b, atol=1e-6, rtol=0)
    norms = path.flatten(1).norm(dim=1)
    lerp_mid = ((a + b) / 2).norm()
    # Two independent draws are nearly orthogonal with nearly equal norms: slerp stays near radius 8 = sqrt(64),
    # the straight line sags to ~8 / sqrt(2) in the middle.
    assert norms.min() > 0.9 * min(a.norm(), b.norm()) and lerp_mid < 0.8 * norms[4]
    same = slerp(a, 2 * a, torch.tensor([0.5], dtype=torch.float64))  # parallel: the straight line
    torch.testing.assert_close(same[0], 1.5 * a)


def test_slerp_path_shares_keys():
    keys = initial_noise([1, 2, 3], (1, 8, 8))[0]
    path = slerp_path(keys, 4)
    assert path.shape == (7, 1, 8, 8)
    assert torch.equal(path[0], keys[0]) and torch.equal(path[3], keys[1]) and torch.equal(path[6], keys[2])
    with pytest.raises(StridelabError, match="at least 2 key noises"):
        slerp_path(keys[:1], 4)
    with pytest.raises(StridelabError, match=">= 2"):
        slerp_path(keys, 1)


def test_smoothness_of_a_straight_even_path_is_one():
    f = np.linspace([0.0, 0.0], [3.0, 4.0], 6)  # 5 equal steps of 1
    s = path_smoothness(f, 6)
    assert s["mean_step"] == pytest.approx(1.0) and s["max_step"] == pytest.approx(1.0) and s["chord"] == pytest.approx(5)
    assert s["length_ratio"] == pytest.approx(1.0) and s["max_jump"] == pytest.approx(1.0)
    jumpy = np.array([[0.0, 0], [0.1, 0], [0.2, 0], [5.0, 0]])  # one switch at the end
    j = path_smoothness(jumpy, 4)
    assert j["length_ratio"] == pytest.approx(1.0) and j["max_jump"] == pytest.approx(4.8 * 3 / 5)
    with pytest.raises(StridelabError, match="features must be"):
        path_smoothness(f, 4)  # 6 frames do not make segments of 4


# --------------------------------------------------------------------------------------------------
# The command


@pytest.fixture(scope="module")
def model():
    return load_model("bundled:digits")


def test_seeds_morph_strip_and_figures(tmp_path, model):
    out = tmp_path / "m"
    assert main(["interpolate", "--seeds", "1,2", "--frames", "5", "--schedule", "uniform", "--nfe", "5",
                 "--out-dir", str(out), "--no-mlflow"]) == 0
    figs = json.loads((out / "smoothness.json").read_text())
    assert Image.open(out / "strip.png").size == (5 * 33 + 1, 33 + 1)
    # The chord is the feature distance of the two seeds' own samples: the ends are exactly those samples.
    x_T = initial_noise([1, 2], model.sample_shape)[0]
    ends = model.to_unit(ddim_sample(model.denoiser, x_T, uniform(5, model.alphas_cumprod).timesteps, model.alphas_cumprod))
    f = make_feature_fn("digits")(ends.clamp(0, 1))
    assert figs["chord"] == pytest.approx(float(np.linalg.norm(f[0] - f[1])), rel=1e-5)
    assert figs["length_ratio"] >= 1.0 - 1e-9 and figs["max_step"] >= figs["mean_step"] > 0
    assert figs["keys"] == ["seed 1", "seed 2"] and figs["timesteps"] == [800, 600, 400, 200, 0]


def test_noise_from_invert_and_mlflow(tmp_path, model, monkeypatch):
    from pipeline.models.digits import load_digits_images

    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "x.npy", load_digits_images("test")[:3].numpy())
    assert main(["invert", "--images", "x.npy", "--schedule", "uniform", "--nfe", "5", "--out-dir", "inv"]) == 0
    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    assert main(["interpolate", "--noise", "inv/noise.safetensors", "--pick", "0,2", "--frames", "3",
                 "--schedule", "inv/schedule.json", "--out-dir", "m", "--tracking-uri", uri]) == 0
    assert json.loads((tmp_path / "m" / "smoothness.json").read_text())["keys"] == ["0", "2"]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("stridelab-interpolate").experiment_id])
    assert {"mean_step", "max_step", "chord", "length_ratio", "max_jump"} <= set(run.data.metrics)
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["strip.png"]


@pytest.mark.parametrize("argv,message", [
    (["--seeds", "1"], "at least 2 key noises"),
    (["--seeds", "1,2", "--frames", "1"], "--frames must be >= 2"),
    (["--seeds", "1,2", "--pick", "0"], "--pick goes with --noise"),
    (["--noise", "nowhere.safetensors"], "no such file"),
    (["--noise", "junk.safetensors"], "not a noise file written by `stridelab invert`"),
    (["--seeds", "1,2", "--solver", "nope"], "--solver must be one of"),
])
def test_bad_inputs_are_one_line_and_write_nothing(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    rc = main(["interpolate", *argv, "--schedule", "uniform", "--nfe", "5", "--out-dir", "m", "--no-mlflow"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not (tmp_path / "m").exists()
    assert len(err) == 1 and message in err[0], err


def test_noise_at_another_level_is_refused(tmp_path, monkeypatch, capsys):
    from pipeline.models.digits import load_digits_images

    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "x.npy", load_digits_images("test")[:2].numpy())
    assert main(["invert", "--images", "x.npy", "--schedule", "uniform", "--nfe", "5", "--out-dir", "inv"]) == 0
    capsys.readouterr()
    rc = main(["interpolate", "--noise", "inv/noise.safetensors", "--schedule", "uniform", "--nfe", "10",
               "--out-dir", "m", "--no-mlflow"])
    err = capsys.readouterr().err
    assert rc == 2 and "holds codes at timestep 800 but --schedule starts at 900" in err and not (tmp_path / "m").exists()
    rc = main(["interpolate", "--noise", "inv/noise.safetensors", "--pick", "0,5", "--schedule", "uniform", "--nfe", "5",
               "--out-dir", "m", "--no-mlflow"])
    assert rc == 2 and "--pick 5 is out of range" in capsys.readouterr().err
