"""Exported schedules: every field, a round trip through Schedule.load, sigmas, model checks, CLI."""

from __future__ import annotations

import json

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
    write_trials_parquet,
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


# --------------------------------------------------------------------------------------------------
# The solver a schedule was tuned with, and the ComfyUI / k-diffusion formats


def _dpm2m():
    from pipeline.solvers.base import SolverSpec
    from pipeline.solvers.registry import SOLVERS

    return SolverSpec("dpmsolver++2m", SOLVERS["ddim"].sample, 2, "DPM-Solver++ 2M",
                      diffusers_class="DPMSolverMultistepScheduler",
                      diffusers_config={"algorithm_type": "dpmsolver++", "solver_order": 2, "final_sigmas_type": "zero",
                                        "lower_order_final": True},
                      k_diffusion="sample_dpmpp_2m", comfyui="dpmpp_2m", multistep=True)


@pytest.fixture
def dpm2m(monkeypatch):
    """A registered dpmsolver++2m (test-local until the family's registry has it)."""
    from pipeline.solvers.registry import SOLVERS

    spec = _dpm2m()
    monkeypatch.setitem(SOLVERS, spec.name, spec)
    return spec


def _stored_study(tmp_path, ring8, solver: str | None, name: str = "st"):
    """A study as a sweep leaves it (model, T, hash, and `solver` when not None), with one complete trial."""
    storage = make_storage(tmp_path / "optuna.journal")
    study = optuna.create_study(study_name=name, storage=storage)
    for k, v in {"model": ring8.spec, "num_train_timesteps": 1000,
                 "alphas_cumprod_sha256": alphas_cumprod_sha256(ring8.alphas_cumprod), "solver": solver}.items():
        if v is not None:
            study.set_user_attr(k, v)
    sched = make_schedule("karras", 6, ring8.alphas_cumprod)
    study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={
        "timesteps": list(sched.timesteps), "sigmas": sched.sigmas(ring8.alphas_cumprod).tolist(), "recon": 0.5}))
    return study, sched


def test_export_records_the_solver_of_the_schedule(tmp_path, ring8, dpm2m):
    sched = make_schedule("karras", 8, ring8.alphas_cumprod)
    tuned = Schedule(sched.timesteps, 1000, "learned", {}, {"solver": dpm2m.record()})
    path = write_export(tmp_path / "s.json", export_for_model(tuned, ring8))
    d = json.loads(path.read_text())
    assert d["solver"] == dpm2m.record() and d["solver"]["diffusers_config"]["final_sigmas_type"] == "zero"
    back = Schedule.load(path)  # file -> Schedule keeps it
    assert back.meta["solver"] == dpm2m.record()
    from pipeline.interop.reuse import recorded_solver

    assert recorded_solver(back) == dpm2m.record()
    # No solver recorded (a schedule from before solvers): DDIM, and the record says it was assumed.
    d = export_for_model(sched, ring8)
    assert d["solver"]["name"] == "ddim" and "made before" in d["solver"]["assumed"]


def test_old_exports_still_load(exported, tmp_path):
    """A file written before exports recorded a solver: loads, no solver in meta."""
    _, path = exported
    d = json.loads(path.read_text())
    del d["solver"], d["meta"]["solver"]
    (tmp_path / "old.json").write_text(json.dumps(d))
    back = Schedule.load(tmp_path / "old.json")
    assert back.timesteps == tuple(d["timesteps"]) and "solver" not in back.meta


def test_export_from_study_records_the_studys_solver_and_parquet_too(tmp_path, ring8, dpm2m):
    from search.export import export_from_study

    study, sched = _stored_study(tmp_path, ring8, "dpmsolver++2m")
    d = json.loads(export_from_study(study, tmp_path / "s.json").read_text())
    assert d["solver"] == dpm2m.record() and "assumed" not in d["solver"]
    assert d["timesteps"] == list(sched.timesteps)
    write_trials_parquet(study, tmp_path / "t.parquet")
    assert pq.read_table(tmp_path / "t.parquet").to_pylist()[0]["solver"] == "dpmsolver++2m"
    # A study from before solvers: DDIM, said so.
    old, _ = _stored_study(tmp_path, ring8, None, name="old")
    d = json.loads(export_from_study(old, tmp_path / "o.json").read_text())
    assert d["solver"]["name"] == "ddim" and d["solver"]["assumed"]
    write_trials_parquet(old, tmp_path / "o.parquet")
    assert pq.read_table(tmp_path / "o.parquet").to_pylist()[0]["solver"] == "ddim"


def test_comfyui_and_k_diffusion_formats(tmp_path, ring8, dpm2m):
    from pipeline.interop.sigma_lists import parse_sigma_string, schedule_from_sigmas
    from search.export import downstream

    sched = make_schedule("karras", 8, ring8.alphas_cumprod)
    obj = export_for_model(Schedule(sched.timesteps, 1000, "learned", {}, {"solver": dpm2m.record()}), ring8)
    c = json.loads(write_export(tmp_path / "c.json", obj, "comfyui").read_text())
    assert c["sampler_name"] == "dpmpp_2m" and "ManualSigmas" in c["nodes"] and "SamplerCustom" in c["nodes"]
    assert isinstance(c["sigmas"], str) and c["sigmas"].endswith(", 0")
    sig = parse_sigma_string(c["sigmas"])
    assert sig == obj["sigmas"] and len(sig) == 9
    assert schedule_from_sigmas(sig, ring8.alphas_cumprod).timesteps == sched.timesteps
    assert Schedule.load(tmp_path / "c.json").meta["solver"] == dpm2m.record()
    k = json.loads(write_export(tmp_path / "k.json", obj, "k-diffusion").read_text())
    assert k["sampler"] == "sample_dpmpp_2m" and k["sigmas"] == obj["sigmas"]
    # A solver with no sampler in that tool: one line naming the others.
    rec = {**dpm2m.record(), "name": "x", "comfyui": None}
    with pytest.raises(StridelabError, match="'x' has no ComfyUI sampler; use diffusers DPMSolverMultistepScheduler"):
        downstream({**obj, "solver": rec, "meta": {**obj["meta"], "solver": rec}}, "comfyui")
    with pytest.raises(StridelabError, match="must be one of stridelab, comfyui, k-diffusion"):
        downstream(obj, "a1111")


def test_export_cli_format_and_solver_note(tmp_path, ring8, capsys, dpm2m):
    from jobs.cli import main
    from jobs.export import FORMATS as CLI_FORMATS
    from search.export import FORMATS

    assert CLI_FORMATS == FORMATS
    storage = str(tmp_path / "optuna.journal")
    _stored_study(tmp_path, ring8, None, name="old")
    _stored_study(tmp_path, ring8, "dpmsolver++2m", name="new")
    capsys.readouterr()
    assert main(["export", "--study-name", "old", "--storage", storage, "--out", str(tmp_path / "o.json")]) == 0
    err = capsys.readouterr().err
    assert "note: solver ddim: no solver recorded" in err and len(err.strip().splitlines()) == 1
    out = tmp_path / "c.json"
    assert main(["export", "--study-name", "new", "--storage", storage, "--format", "comfyui", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["sampler_name"] == "dpmpp_2m" and capsys.readouterr().err == ""
    # No k-diffusion twin: one line, exit 2, no file.
    from pipeline.solvers.registry import SOLVERS
    import dataclasses

    SOLVERS["dpmsolver++2m"] = dataclasses.replace(dpm2m, k_diffusion=None)
    bad = tmp_path / "k.json"
    assert main(["export", "--study-name", "new", "--storage", storage, "--format", "k-diffusion", "--out", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stridelab export: error: solver 'dpmsolver++2m' has no k-diffusion sampler")
    assert len(err.strip().splitlines()) == 1 and not bad.exists()


def test_export_from_an_old_run_artifact_gets_ddim_assumed(tmp_path, ring8):
    """An MLflow run whose best_schedule.json predates solver records: the export says DDIM, assumed."""
    import mlflow

    from search.export import export_from_run

    sched = make_schedule("karras", 5, ring8.alphas_cumprod)
    old = export_for_model(sched, ring8)
    del old["solver"], old["meta"]["solver"]
    (tmp_path / "best_schedule.json").write_text(json.dumps(old))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run() as run:
            mlflow.log_artifact(str(tmp_path / "best_schedule.json"))
    finally:
        mlflow.set_tracking_uri(None)
    d = json.loads(export_from_run(run.info.run_id, tmp_path / "s.json", uri).read_text())
    assert d["solver"]["name"] == "ddim" and d["solver"]["assumed"] and d["meta"]["solver"] == d["solver"]
    c = json.loads(export_from_run(run.info.run_id, tmp_path / "c.json", uri, fmt="comfyui").read_text())
    assert c["sampler_name"] == "ddim" and c["timesteps"] == list(sched.timesteps)
