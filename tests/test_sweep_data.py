"""`sweep --data PATH`: a user's images, split once into tuning / validation / held-out parts, are what an inversion
sweep round-trips (trials on the tuning part, the table on the held-out part); bad images get one line, nothing written.

The images are real digits written as a PNG folder by the test; the model is the bundled digits UNet.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from jobs.cli import main
from pipeline.errors import StridelabError
from pipeline.metrics.recon import inversion_errors
from pipeline.models import digits
from pipeline.models.load import load_model
from search.sweep import SweepConfig, run_sweep
from search.sweep.config import HOLDOUT_OFFSET
from search.sweep.data import LoaderWithData, load_sweep_data, split_parts

N_IMAGES = 20
pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py: tiny tensors, a busy 2-core box


def _write_pngs(folder, x01: np.ndarray) -> None:
    folder.mkdir()
    for i, u in enumerate(x01):
        Image.fromarray(np.round(u[0] * 255).astype(np.uint8), mode="L").save(folder / f"img{i:03d}.png")


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "pngs"
    u = ((digits.load_digits_images("test")[:N_IMAGES] + 1) / 2).numpy()
    _write_pngs(folder, u)
    return folder


@pytest.fixture(scope="module")
def model():
    return load_model("bundled:digits")


def test_split_is_fixed_disjoint_and_complete():
    for n in (10, 20, 37, 500):
        a, b = split_parts(n), split_parts(n)
        assert all((a[k] == b[k]).all() for k in a)
        allidx = np.concatenate([a["tuning"], a["validation"], a["holdout"]])
        assert sorted(allidx.tolist()) == list(range(n))
        assert min(len(v) for v in a.values()) >= 2
    p = split_parts(500)
    assert len(p["holdout"]) == 100 and len(p["validation"]) == 100 and len(p["tuning"]) == 300
    assert p["holdout"].max() > 400 and p["holdout"].min() < 100  # a permutation, not the last files
    with pytest.raises(StridelabError, match="at least 10"):
        split_parts(9)


def test_seeds_name_images_of_their_part_only(pngs, model):
    data = load_sweep_data(str(pngs), model.sample_shape, model.data_range, base_seed=5, block_size=HOLDOUT_OFFSET)
    x_all = ((digits.load_digits_images("test")[:N_IMAGES] + 1) / 2 * 255).round() / 255 * 2 - 1
    parts = split_parts(N_IMAGES)
    got = data([5, 6, 5 + HOLDOUT_OFFSET, 5 + 2 * HOLDOUT_OFFSET + 1])
    want = x_all[[parts["tuning"][0], parts["tuning"][1], parts["holdout"][0], parts["validation"][1]]]
    assert torch.allclose(got, want, atol=1e-6)
    with pytest.raises(StridelabError, match="asks for image"):
        data([5 + len(parts["tuning"])])  # past the tuning part: never an image of another part
    back = pickle.loads(pickle.dumps(LoaderWithData(data)))  # what a Ray actor receives
    assert back.data.digest == data.digest and torch.equal(back.data([6]), got[1:2])


def test_sweep_on_a_png_folder_tunes_on_tuning_and_reports_held_out(pngs, model, tmp_path):
    cfg = SweepConfig(model="bundled:digits", nfe=3, objective="inversion", trials=6, parallel=3,
                      baselines=("uniform", "quadratic", "karras"), teacher_nfe=20, polish=1, holdout_fid=False,
                      grid_seeds=4, data=str(pngs))
    res = run_sweep(cfg, study_name="d", out_dir=tmp_path / "out", model=model, track=False, figures=False,
                    actors=0, log=lambda *_: None)
    data = model.denoiser.sample_data
    n = data.counts()
    assert n == {"tuning": 12, "validation": 4, "holdout": 4}
    hold = data.parts["holdout"]
    for row in res.rows:
        if row["schedule"] in ("uniform", "karras") and "holdout_inversion" in row:
            ts = [int(t) for t in row["timesteps"].split()]
            want = inversion_errors(model.denoiser, hold, ts, model.alphas_cumprod, model.to_unit).mean().item()
            assert row["holdout_inversion"] == pytest.approx(want, rel=1e-6), row["schedule"]
    assert np.isfinite(res.rows[0]["inv_x_best_baseline"])


def test_pool_workers_draw_the_user_images(pngs, model):
    """Workers (here the in-process one; Ray actors get the same pickled loader) load the model with the images."""
    from pipeline.core.schedules import Schedule
    from pipeline.distributed import SamplerPool

    data = load_sweep_data(str(pngs), model.sample_shape, model.data_range, 0, HOLDOUT_OFFSET)
    seeds = [HOLDOUT_OFFSET + i for i in range(4)]
    pool = SamplerPool("bundled:digits", seeds, 20, inversion=True, actors=0, loader=LoaderWithData(data))
    ts = (800, 400, 100)
    res = pool.evaluate([Schedule(ts, 1000, "t")])[0]
    pool.close()
    want = inversion_errors(model.denoiser, data.parts["holdout"], ts, model.alphas_cumprod, model.to_unit)
    assert torch.allclose(res.inversion.double(), want.double(), rtol=1e-5, atol=1e-9)


def _sweep_cli(tmp_path, data, *extra):
    return main(["sweep", "--data", str(data), "--objective", "inversion", "--nfe", "3", "--trials", "5",
                 "--teacher-nfe", "20", "--schedules", "uniform,karras", "--polish", "1", "--actors", "0", "--no-mlflow", "--no-holdout-fid",
                 "--out-dir", str(tmp_path / "out"), *extra])


@pytest.mark.parametrize("case", ["few", "size", "rgb", "range", "objective"])
def test_bad_data_is_one_line_and_writes_nothing(tmp_path, capsys, case):
    u = ((digits.load_digits_images("test")[:N_IMAGES] + 1) / 2).numpy()
    extra: tuple[str, ...] = ()
    if case == "few":
        _write_pngs(tmp_path / "d", u[:9])
        data, want = tmp_path / "d", "at least 10"
    elif case == "size":
        _write_pngs(tmp_path / "d", u)
        Image.new("L", (9, 8)).save(tmp_path / "d" / "img005.png")
        data, want = tmp_path / "d", "img005.png: is 9x8 pixels"
    elif case == "rgb":
        _write_pngs(tmp_path / "d", u)
        Image.new("RGB", (8, 8)).save(tmp_path / "d" / "img002.png")
        data, want = tmp_path / "d", "img002.png: has 3 channel(s)"
    elif case == "range":
        data = tmp_path / "x.npy"
        np.save(data, u * 255.0)
        want = "outside the model's data range"
    else:
        _write_pngs(tmp_path / "d", u)
        data, want, extra = tmp_path / "d", "--data", ("--objective", "recon")
    rc = _sweep_cli(tmp_path, data, *extra)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert want in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.json"))


def test_sweep_on_a_png_folder_with_time_shift_draws_the_round_trips(pngs, tmp_path, capsys):
    # the user's images end to end through the CLI: the round trip's shifts learned on the tuning part, and the
    # figure of the held-out part's round trips (originals, best baseline, learned, learned unshifted)
    assert _sweep_cli(tmp_path, pngs, "--time-shift", "--shift-iters", "3") == 0
    printed = capsys.readouterr().out
    assert "time shift from trial" in printed
    (run_dir,) = [p for p in (tmp_path / "out").iterdir() if p.is_dir()]
    fig = Image.open(run_dir / "inversion.png")
    assert fig.size[0] > 300 and fig.size[1] > 300
