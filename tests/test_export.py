"""Exported schedules: every field, a round trip through Schedule.load, sigmas, model checks, CLI."""

from __future__ import annotations

import json
import warnings

import optuna
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.errors import StridelabError
from pipeline.evaluation.inprocess import InProcessEvaluator
from pipeline.models.load import LoadedModel, load_model
from pipeline.core.noise import make_alphas_cumprod
from pipeline.core.schedules import Schedule, make_schedule
from search.export import (
    EXPORT_FIELDS,
    alphas_cumprod_sha256,
    check_schedule_for_model,
    export_for_model,
    write_export,
)
from search.study import make_storage
from search.sweep import SweepConfig, run_sweep


@pytest.fixture(scope="module")
def ring8():
    return load_model("gmm:ring8")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, ring8):
    sched = make_schedule("karras", 10, ring8.alphas_cumprod)
    obj = export_for_model(sched, ring8, {"holdout_recon": 1e-3}, {"study": "s", "stridelab_version": "0.1.0"})
    path = write_export(tmp_path_factory.mktemp("exp") / "schedule.json", obj)
    return sched, path


def test_json_has_every_field_and_round_trips(exported, ring8):
    sched, path = exported
    d = json.loads(path.read_text())
    assert set(EXPORT_FIELDS) <= set(d)
    assert d["timesteps"] == sorted(d["timesteps"], reverse=True) == list(sched.timesteps)
    assert d["nfe"] == 10 and d["num_train_timesteps"] == 1000 and d["model"] == "gmm:ring8"
    assert d["alphas_cumprod_sha256"] == alphas_cumprod_sha256(ring8.alphas_cumprod)
    assert {"study", "stridelab_version", "date"} <= set(d["provenance"])
    back = Schedule.load(path)
    assert back.timesteps == sched.timesteps and back.meta["model"] == "gmm:ring8"
    assert back.meta["alphas_cumprod_sha256"] == d["alphas_cumprod_sha256"]


def test_sigmas_end_in_zero_and_match_schedule_sigmas(exported, ring8):
    sched, path = exported
    sig = json.loads(path.read_text())["sigmas"]
    assert len(sig) == 11 and sig[-1] == 0.0
    assert sig == sched.sigmas(ring8.alphas_cumprod).tolist()


def test_hash_is_of_float64_bytes():
    a = make_alphas_cumprod()
    assert alphas_cumprod_sha256(a) == alphas_cumprod_sha256(a.float().double())
    assert alphas_cumprod_sha256(a) != alphas_cumprod_sha256(make_alphas_cumprod("squaredcos_cap_v2"))


def test_check_schedule_for_another_model(exported, ring8):
    _, path = exported
    sched = Schedule.load(path)
    check_schedule_for_model(sched, ring8)  # same model: fine
    other = LoadedModel("gmm:ring8-cos", ring8.denoiser, make_alphas_cumprod("squaredcos_cap_v2"), (2,))
    with pytest.raises(StridelabError, match="tuned for gmm:ring8"):
        check_schedule_for_model(sched, other)
    with pytest.warns(UserWarning, match="other noise levels"):
        check_schedule_for_model(sched, other, allow=True)
    short = LoadedModel("short", ring8.denoiser, make_alphas_cumprod(num_train_timesteps=500), (2,))
    with pytest.raises(StridelabError, match="T = 1000"):
        check_schedule_for_model(sched, short, allow=True)
    with pytest.warns(UserWarning, match="no alphas_cumprod_sha256"):
        check_schedule_for_model(Schedule(sched.timesteps), ring8)


def test_bad_sigmas_refused(ring8):
    from search.export import export_dict

    s = make_schedule("uniform", 5, ring8.alphas_cumprod)
    with pytest.raises(StridelabError, match="ending in 0"):
        export_dict(s, model="m", sigmas=[1.0] * 6, alphas_hash="x")


def test_export_cli_from_study_and_parquet(tmp_path, ring8, capsys):
    from jobs.cli import main

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = SweepConfig(model="gmm:ring8", nfe=5, trials=6, parallel=2, num_seeds=16, holdout_seeds=16,
                          baselines=("uniform", "quadratic", "dp"), teacher_nfe=50, dp_seeds=8, dp_grid=30)
        res = run_sweep(cfg, study_name="exp", out_dir=tmp_path, model=ring8, track=False, figures=False,
                        evaluators=lambda seeds: InProcessEvaluator(ring8, seeds, teacher_nfe=50), log=lambda *_: None)
    finally:
        torch.set_num_threads(n)
    out = tmp_path / "s.json"
    rc = main(["export", "--study-name", "exp", "--storage", str(tmp_path / "optuna.journal"), "--out", str(out),
               "--table", str(tmp_path / "t.parquet")])
    assert rc == 0, capsys.readouterr().err
    d = json.loads(out.read_text())
    assert d["timesteps"] == list(res.best.timesteps) and d["provenance"]["study"] == "exp"
    assert d["alphas_cumprod_sha256"] == alphas_cumprod_sha256(ring8.alphas_cumprod)
    assert d["sigmas"] == res.best.sigmas(ring8.alphas_cumprod).tolist()
    assert Schedule.load(out).nfe == 5
    rows = pq.read_table(tmp_path / "t.parquet").to_pylist()
    assert len(rows) == 6 and {"trial", "state", "params", "timesteps", "recon"} <= set(rows[0])
    # the sweep's own export is the same schedule
    assert json.loads((res.out_dir / "best_schedule.json").read_text())["timesteps"] == d["timesteps"]
    capsys.readouterr()
    assert main(["export", "--study-name", "nope", "--storage", str(tmp_path / "optuna.journal"), "--out", str(out)]) == 2
    assert "no study named" in capsys.readouterr().err

    # --trial: any COMPLETE trial, e.g. another point of a Pareto front; trial 0 is the first warm start
    capsys.readouterr()
    first = tmp_path / "t0.json"
    assert main(["export", "--study-name", "exp", "--storage", str(tmp_path / "optuna.journal"), "--trial", "0",
                 "--out", str(first)]) == 0
    d0 = json.loads(first.read_text())
    assert d0["timesteps"] == list(make_schedule("uniform", 5, ring8.alphas_cumprod).timesteps)
    assert d0["provenance"]["trial"] == 0 and d0["name"] == "uniform"
    capsys.readouterr()
    assert main(["export", "--study-name", "exp", "--storage", str(tmp_path / "optuna.journal"), "--trial", "99",
                 "--out", str(tmp_path / "t99.json")]) == 2
    assert "has no trial 99" in capsys.readouterr().err and not (tmp_path / "t99.json").exists()
    assert main(["export", "--run", "0" * 32, "--trial", "1", "--out", str(tmp_path / "r.json")]) == 2
    assert "--trial needs --study" in capsys.readouterr().err


def test_trial_by_number_refuses_a_trial_that_did_not_complete():
    from search.export import trial_by_number

    study = optuna.create_study(study_name="s")
    t = study.ask()
    study.tell(t, state=optuna.trial.TrialState.PRUNED)
    study.enqueue_trial({})
    study.optimize(lambda tr: 1.0, n_trials=1)
    assert trial_by_number(study, 1).number == 1
    with pytest.raises(StridelabError, match="trial 0 of study 's' is PRUNED, not COMPLETE"):
        trial_by_number(study, 0)
