"""`sweep --objective inversion`: trials minimise the DDIM round trip of real data; the held-out table reports it.

A tiny sweep on gmm:ring8 (exact data draws, analytic model) through the sweep's own evaluator factory
(``actors=0``), the bundled digits' seed-to-image split, and the one-line error for a model with no data.
"""

from __future__ import annotations

import math

import pytest
from optuna.trial import TrialState

from jobs.cli import main
from pipeline.core.schedules import make_schedule, with_noisiest_step
from pipeline.errors import StridelabError
from pipeline.metrics.recon import round_trip
from pipeline.models import digits
from pipeline.models.bundled import DIGITS_DDPM_DIR
from pipeline.models.load import load_model
from search.evaluators import Objective
from search.study import make_storage
from search.sweep import SweepConfig, run_sweep
from search.sweep.config import HOLDOUT_OFFSET, VALIDATION_OFFSET

import optuna

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


@pytest.fixture(scope="module")
def ring8():
    return load_model("gmm:ring8")


@pytest.fixture(scope="module")
def swept(tmp_path_factory, ring8):
    tmp = tmp_path_factory.mktemp("inv")
    cfg = SweepConfig(model="gmm:ring8", nfe=5, objective="inversion", trials=10, parallel=3, num_seeds=24,
                      holdout_seeds=24, validation_seeds=8, baselines=("uniform", "quadratic", "karras", "logsnr"),
                      teacher_nfe=50, polish=2, holdout_fid=False, grid_seeds=4)
    res = run_sweep(cfg, study_name="inv", out_dir=tmp / "out", model=ring8, track=False, figures=False,
                    actors=0, log=lambda *_: None)
    study = optuna.load_study(study_name="inv", storage=make_storage(str(tmp / "out" / "optuna.journal")))
    return cfg, res, study


def test_trial_values_are_round_trip_means(swept, ring8):
    cfg, _, study = swept
    done = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    assert len(done) >= len(cfg.baselines)
    x0 = ring8.denoiser.sample_data(cfg.tuning_seeds)
    for t in (done[0], done[-1]):
        ts = tuple(t.user_attrs["timesteps"])
        want = round_trip(ring8.denoiser, x0, ts[::-1], ts, ring8.alphas_cumprod, ring8.to_unit).errors.mean().item()
        assert t.value == pytest.approx(want, rel=1e-9)
        assert t.user_attrs["inversion"] == t.value
        assert t.user_attrs["recon"] > 0 and t.user_attrs["recon"] != t.value  # recon still recorded, not the value


def test_holdout_rows_have_inversion_and_its_ratio(swept):
    _, res, _ = swept
    learned = res.rows[0]
    for col in ("holdout_inversion", "inv_x_best_baseline", "inv_x_best_baseline_lo", "inv_x_best_baseline_hi"):
        assert math.isfinite(learned[col]), col
    assert learned["inv_x_best_baseline_lo"] <= learned["inv_x_best_baseline"] <= learned["inv_x_best_baseline_hi"]
    base = [r for r in res.rows if r["schedule"] in ("uniform", "quadratic", "karras", "logsnr")]
    assert min(r["inv_x_best_baseline"] for r in base) == pytest.approx(1.0)


def test_every_inversion_trial_encodes_to_x_T(swept, ring8):
    """A round trip that stops lower is easier, not better: trials, warm starts and polish all start at T - 1.
    (Unpinned, a digits sweep found 0.29x the best baseline by encoding only to t = 520.)"""
    _, res, study = swept
    top = ring8.num_train_timesteps - 1
    trials = [t for t in study.get_trials() if "timesteps" in t.user_attrs]
    assert {t.user_attrs.get("kind") for t in trials} >= {"baseline", "polish"}
    assert all(t.user_attrs["timesteps"][0] == top for t in trials)
    quad = next(t for t in trials if t.user_attrs.get("schedule") == "quadratic")  # 0.8 T at the top, unpinned
    assert quad.user_attrs["timesteps"][1:] == list(make_schedule("quadratic", 5, ring8.alphas_cumprod).timesteps[1:])
    assert res.best.timesteps[0] == top


def test_with_noisiest_step_raises_only_a_lower_first_step(ring8):
    abar = ring8.alphas_cumprod
    T = ring8.num_train_timesteps
    quad, lin = make_schedule("quadratic", 5, abar), make_schedule("linspace", 5, abar)
    pinned = with_noisiest_step(quad, T - 1)
    assert pinned.timesteps == (T - 1, *quad.timesteps[1:])
    assert pinned.meta["noisiest_step_was"] == quad.timesteps[0]
    assert with_noisiest_step(lin, T - 1) is lin  # already at T - 1
    with pytest.raises(StridelabError, match="noisiest step"):
        with_noisiest_step(quad, T)


def test_pinned_polish_never_moves_the_first_step():
    import numpy as np

    from search.placement.polish import next_candidates, step_ladder

    ladder = step_ladder(1000)
    inc = (999, 700, 400, 150, 20)
    out = next_candidates(inc, ladder[0], {inc}, 30, 1000, ladder, np.random.default_rng(0), pinned_top=999)
    assert out and all(c[0] == 999 for c, _ in out)
    free = next_candidates(inc, ladder[0], {inc}, 30, 1000, ladder, np.random.default_rng(0))
    assert any(c[0] != 999 for c, _ in free)  # the pin is what keeps it


def test_recon_objective_asks_for_no_inversion(ring8):
    from search.evaluators import EvaluatorFactory

    for name, want in (("recon", False), ("inversion", True), ("recon,inversion", True)):
        f = EvaluatorFactory(ring8, 0, teacher_nfe=10, inversion=Objective(name).needs_inversion, log=lambda *_: None)
        ev = f([0, 1])
        assert (ev.data is not None) is want
        f.close()


def test_digits_image_sets_are_disjoint():
    cfg = SweepConfig(model="bundled:digits", objective="inversion", num_seeds=256, validation_seeds=64,
                      holdout_seeds=256)
    assert HOLDOUT_OFFSET == digits.DATA_SEED_BLOCK and VALIDATION_OFFSET == 2 * digits.DATA_SEED_BLOCK
    tune = {digits.data_index(s) for s in cfg.tuning_seeds}
    val = {digits.data_index(s) for s in cfg.validation_seed_list}
    hold = {digits.data_index(s) for s in cfg.holdout_seed_list}
    assert len(tune) == 256 and len(val) == 64 and len(hold) == 256
    assert not tune & val and {sp for sp, _ in tune | val} == {"train"} and {sp for sp, _ in hold} == {"test"}
    x = digits.data_for_seeds([cfg.holdout_seed_list[3]])
    assert (x[0] == digits.load_digits_images("test")[3]).all()
    with pytest.raises(StridelabError, match="which number 360"):
        digits.data_index(HOLDOUT_OFFSET + 360)  # no wrapping into reused images


def test_inversion_on_a_model_without_data_is_one_line(tmp_path, capsys):
    rc = main(["sweep", "--model", str(DIGITS_DDPM_DIR), "--objective", "inversion", "--actors", "0",
               "--trials", "12", "--no-mlflow", "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "--objective" in err and "--model" in err and "has none to draw from" in err
