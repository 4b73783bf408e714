"""One FID reference policy (`pipeline.metrics.reference`): `stridelab evaluate` and the sweep's held-out
evaluation compare a model's samples with the same features and reference set, so they give the same FID
for the same model and seeds."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from jobs.cli import main
from pipeline.errors import StridelabError
from pipeline.metrics import reference as ref
from pipeline.models.load import load_model
from search.sweep import HOLDOUT_OFFSET, SweepConfig, run_sweep

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


@pytest.fixture(scope="module")
def blobs64():
    return load_model("gmm:blobs64")


def test_auto_policy_per_model(blobs64):
    # An analytic 8x8 mixture is not digits: raw values against its own exact draws.
    features, r = ref.fid_inputs(blobs64)
    assert features == "pixels" and r.name == "model" and r.feats.shape == (ref.MODEL_REF_DRAWS, 64)
    assert ref.auto_reference(load_model("gmm:ring8")) == "model"
    digits = load_model("bundled:digits")
    assert (ref.auto_features(digits), ref.auto_reference(digits)) == ("digits", "digits")


def test_model_reference_is_a_property_of_the_model(blobs64):
    """Explicit and automatic choices give the same set: it does not depend on a run's seeds or size."""
    _, a = ref.fid_inputs(blobs64)
    _, b = ref.fid_inputs(blobs64, "pixels", "model")
    np.testing.assert_array_equal(a.mu, b.mu)
    np.testing.assert_array_equal(a.sigma, b.sigma)


def test_mismatched_features_and_reference_are_one_error(blobs64):
    with pytest.raises(StridelabError, match="do not match"):
        ref.fid_inputs(blobs64, "pixels", "cleanfid:cifar10:32")
    with pytest.raises(StridelabError, match="cannot draw data"):
        ref.build_reference(load_model("bundled:digits"), "model", "digits")


def test_evaluate_and_sweep_holdout_give_the_same_fid(tmp_path, blobs64):
    cfg = SweepConfig(model="gmm:blobs64", nfe=4, trials=2, parallel=1, num_seeds=4, holdout_seeds=24, seed=5,
                      baselines=("uniform",), prune=False, polish=0, teacher_nfe=20)
    res = run_sweep(cfg, study_name="fid", out_dir=tmp_path / "sweep", model=blobs64, actors=0, track=False,
                    figures=False, log=lambda *_: None)
    sweep_fid = next(r["holdout_fid"] for r in res.rows if r["schedule"] == "uniform")

    out = tmp_path / "eval.csv"
    assert main(["evaluate", "--model", "gmm:blobs64", "--schedules", "uniform", "--nfe", "4", "--metrics", "fid",
                 "--seed", str(cfg.seed + HOLDOUT_OFFSET), "--num-seeds", str(cfg.holdout_seeds),
                 "--teacher-nfe", "20", "--actors", "0", "--out", str(out)]) == 0
    with open(out, newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["fid"]) == pytest.approx(sweep_fid, rel=1e-12)
