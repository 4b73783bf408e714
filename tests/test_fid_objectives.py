"""The FID objectives on the real feature path: the bundled digits model, the bundled digits feature network
and the digits reference, through `run_sweep` with its default evaluators (no stand-in FID).

Each trial's FID is recomputed here from its timesteps (DDIM on the tuning seeds, the feature net, the
reference's features), so a sweep that optimised anything else than the FID of its own samples fails."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.trial import TrialState

from pipeline.core import initial_noise
from pipeline.metrics import fid
from pipeline.metrics.features import fid_from_features
from pipeline.models import load_model
from pipeline.solvers import ddim_sample
from search.study import make_storage
from search.sweep import SweepConfig, run_sweep

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py

NFE, TEACHER_NFE, SEEDS = 4, 20, 16  # 16 seeds: `--num-seeds 8` crashes (a known bug)


@pytest.fixture(scope="module")
def digits():
    return load_model("bundled:digits")


@pytest.fixture(scope="module")
def fid_of(digits):
    """timesteps -> FID of their DDIM samples on the sweep's tuning seeds, computed here, not by the sweep."""
    features = fid.default_features(digits.sample_shape)
    assert features == "digits"  # the bundled feature network, not raw pixels
    ref = fid.digits_reference("all", features)
    fn = fid.make_feature_fn(features)
    x_T, _ = initial_noise(range(SEEDS), digits.sample_shape)

    def compute(timesteps):
        x0 = ddim_sample(digits.denoiser, x_T, list(timesteps), digits.alphas_cumprod)
        return fid_from_features(fid.features_in_chunks(fn, digits.to_unit(x0), 64), ref.feats)

    return compute


def _sweep(tmp_path, digits, objective, sampler):
    cfg = SweepConfig(model="bundled:digits", nfe=NFE, trials=5, parallel=2, num_seeds=SEEDS, holdout_seeds=SEEDS,
                      seed=0, sampler=sampler, objective=objective, baselines=("uniform", "quadratic"),
                      teacher_nfe=TEACHER_NFE, polish=1)
    res = run_sweep(cfg, study_name="f", out_dir=tmp_path, model=digits, track=False, figures=False,
                    log=lambda *_: None)
    study = optuna.load_study(study_name="f", storage=make_storage(tmp_path / "optuna.journal"))
    return res, study


@pytest.mark.parametrize("objective,sampler", [("fid", "tpe"), ("recon+fid", "tpe"), ("recon,fid", "nsga2")])
def test_fid_objectives_optimise_the_real_fid(tmp_path, digits, fid_of, objective, sampler):
    res, study = _sweep(tmp_path, digits, objective, sampler)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(study.trials) == 5 and len(done) == 5  # no pruning without a recon-only objective
    fids = []
    for t in done:
        got, recon = t.user_attrs["fid"], t.user_attrs["recon"]
        assert got == pytest.approx(fid_of(t.user_attrs["timesteps"]), rel=1e-4), t.number
        want = {"fid": [got], "recon+fid": [math.log(recon) + 1.0 * math.log(got)], "recon,fid": [recon, got]}
        assert t.values == pytest.approx(want[objective], rel=1e-12), t.number
        fids.append(got)
    # a real FID: positive, and it tells schedules apart (a stand-in or a constant would not)
    assert all(f > 0 for f in fids) and len({round(f, 6) for f in fids}) == len(fids)
    # the held-out table has real FIDs too, and the teacher's row is the floor under the baselines
    rows = {r["schedule"]: r for r in res.rows}
    teacher = next(r for name, r in rows.items() if name.startswith("teacher ("))
    assert teacher["holdout_recon"] == 0
    base = [rows[b]["holdout_fid"] for b in ("uniform", "quadratic")]
    assert all(math.isfinite(r["holdout_fid"]) and r["holdout_fid"] > 0 for r in res.rows)
    assert teacher["holdout_fid"] < min(base)
    if objective == "recon,fid":
        assert len(study.directions) == 2 and study.best_trials
