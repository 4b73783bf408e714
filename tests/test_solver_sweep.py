"""`--solver` through every stage: the sweep's trials, warm starts, held-out table and export run the chosen
solver; the pool and the in-process evaluator agree for it on any number of actors; `sample` and
`evaluate` take it; a study resumes only with the solver it was made with."""

from __future__ import annotations

import json

import optuna
import pytest
import torch

from jobs.cli import main
from pipeline.distributed import SamplerPool
from pipeline.errors import StridelabError
from pipeline.evaluation.inprocess import InProcessEvaluator
from pipeline.interop.defaults import default_spacing
from pipeline.models.load import load_model
from pipeline.core.schedules import make_schedule
from pipeline.solvers.registry import SOLVERS, solve
from search.placement.dp import heun_jump_costs, jump_costs, teacher_trajectory
from search.sweep import SweepConfig, run_sweep
from search.sweep.config import baselines_for

pytestmark = pytest.mark.usefixtures("one_thread")

SOLVER = "dpmsolver++2m"
SEEDS = list(range(12))


@pytest.fixture(scope="module")
def ring8():
    return load_model("gmm:ring8")


@pytest.fixture(scope="module")
def swept(ring8, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    cfg = SweepConfig(model="gmm:ring8", nfe=5, solver=SOLVER, trials=14, parallel=4, num_seeds=16,
                      holdout_seeds=24, teacher_nfe=100, polish=2, dp_grid=40, holdout_fid=False)
    return cfg, run_sweep(cfg, out_dir=out, track=False, actors=0, model=ring8, log=lambda s: None)


def test_warm_starts_are_the_solvers(swept):
    cfg, res = swept
    study = optuna.load_study(study_name=res.study_name, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(res.out_dir.parent / "optuna.journal"))))
    assert study.user_attrs["solver"] == SOLVER
    names = [t.user_attrs.get("schedule") for t in study.trials if t.user_attrs.get("kind") == "baseline"]
    assert names[0] == "default" and set(names) == set(baselines_for(SOLVER))
    assert baselines_for("ddim") == tuple(b for b in baselines_for(SOLVER) if b != "default")


def test_held_out_rows_run_the_solver_and_name_every_other(swept, ring8):
    cfg, res = swept
    rows = {r["schedule"]: r for r in res.rows}
    learned = res.rows[0]
    assert learned["solver"] == SOLVER and learned["nfe"] == 5
    refs = {r["solver"] for r in res.rows if r["schedule"].endswith(" default")}
    assert refs == set(SOLVERS) - {SOLVER}
    heun = rows["heun default"]
    assert heun["steps"] == 3 and heun["nfe"] == 5  # (5 + 1) // 2 steps, 2 * 3 - 1 evaluations
    # The learned row's held-out recon is this solver's, recomputed here in-process.
    ev = InProcessEvaluator(ring8, cfg.holdout_seed_list, cfg.teacher_nfe, solver=SOLVER)
    again = ev.evaluate([res.best])[0].recon.mean().item()
    assert again == pytest.approx(learned["holdout_recon"], rel=1e-6)
    ddim = InProcessEvaluator(ring8, cfg.holdout_seed_list, cfg.teacher_nfe).evaluate([res.best])[0]
    assert ddim.recon.mean().item() != pytest.approx(again, rel=1e-3)  # another solver, another number
    best_any = min(r["holdout_recon"] for r in res.rows if r["schedule"] == "default" or r["schedule"].endswith(" default")
                   or r["schedule"] in ("uniform", "karras", "logsnr", "quadratic"))
    assert learned["x_best_default_pair"] <= learned["holdout_recon"] / best_any * (1 + 1e-9)


def test_export_records_the_solver(swept):
    _, res = swept
    obj = json.loads(res.export_path.read_text())
    rec = obj["meta"]["solver"]
    assert rec["name"] == SOLVER and rec["diffusers_class"] == SOLVERS[SOLVER].diffusers_class
    assert rec["diffusers_config"] == dict(SOLVERS[SOLVER].diffusers_config)


def test_resume_with_another_solver_is_refused(swept, ring8):
    cfg, res = swept
    other = SweepConfig(**{**cfg.__dict__, "solver": "ddim", "baselines": None})
    with pytest.raises(StridelabError, match="`solver`: study has 'dpmsolver\\+\\+2m', asked 'ddim'"):
        run_sweep(other, study_name=res.study_name, resume=True, out_dir=res.out_dir.parent, track=False,
                  actors=0, model=ring8, log=lambda s: None)


@pytest.mark.parametrize("solver", [s for s in SOLVERS if s != "ddim"])
def test_pool_on_actors_equals_in_process(solver, ray_local):
    """Any solver gives the same per-seed recon on 2 actors as in this process (per-sample seeds,
    fixed-size forward batches): bit-identical."""
    model = load_model("gmm:ring8")
    sched = make_schedule("logsnr", 4, model.alphas_cumprod)
    with SamplerPool("gmm:ring8", SEEDS, 50, actors=2, solver=solver) as pool:
        on_actors = pool.evaluate([sched])[0].recon
    with SamplerPool("gmm:ring8", SEEDS, 50, actors=0, solver=solver) as pool:
        here = pool.evaluate([sched])[0].recon
        assert torch.equal(on_actors, here)
        assert not torch.equal(here, pool.evaluate([sched], solver="ddim")[0].recon)


def test_default_spacing_is_what_diffusers_runs(ring8):
    """`default` is each diffusers scheduler's own set_timesteps(n) list (DPM-Solver++: linspace from 999)."""
    ac = ring8.alphas_cumprod
    assert default_spacing(SOLVER, 10, ac).timesteps == (999, 899, 799, 699, 599, 500, 400, 300, 200, 100)
    assert default_spacing("ddim", 10, ac).timesteps == make_schedule("uniform", 10, ac).timesteps


def test_heun_dp_cost_is_one_diffusers_heun_step(ring8):
    """One entry of the Heun DP cost equals one step of diffusers' HeunDiscreteScheduler (2 evaluations)
    from the teacher state at grid i to grid j, against the teacher state at j."""
    from pipeline.interop.defaults import diffusers_twin

    traj = teacher_trajectory(ring8, range(8), 100, 12)
    cost = heun_jump_costs(ring8, traj)
    i, j = 2, 6
    sched = diffusers_twin("heun", ring8.alphas_cumprod)
    sched.set_timesteps(timesteps=[traj.grid[i], traj.grid[j]])
    x = traj.states[i] * (1 + ((1 - ring8.alphas_cumprod[traj.grid[i]]) / ring8.alphas_cumprod[traj.grid[i]])).sqrt()
    for t in sched.timesteps[:2]:  # predictor + corrector of the first step
        eps = ring8.denoiser(sched.scale_model_input(x, t), torch.full((x.shape[0],), int(t), dtype=torch.long))
        x = sched.step(eps, t, x).prev_sample
    a_j = ring8.alphas_cumprod[traj.grid[j]].item()
    x_vp = x * a_j**0.5
    scale = 1.0 / (ring8.data_range[1] - ring8.data_range[0]) ** 2
    want = ((x_vp.double() - traj.states[j].double()) ** 2).mean().item() * scale
    assert cost[i, j] == pytest.approx(want, rel=1e-4)
    assert cost[i, j] != pytest.approx(jump_costs(ring8, traj)[i, j], rel=1e-2)  # not the DDIM jump


def test_sample_cli_solver(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sample", "--model", "gmm:ring8", "--schedule", "karras", "--nfe", "5", "--solver", "heun",
                 "--num-seeds", "4", "--actors", "0", "--out-dir", str(out), "--no-progress"]) == 0
    assert "heun, 3 steps = 5 model evaluations" in capsys.readouterr().out
    meta = json.loads((out / "schedule.json").read_text())["meta"]
    assert meta["sampled_with"]["name"] == "heun"
    x = load_model("gmm:ring8")
    got = solve("heun", x.denoiser, torch.randn(1, 2), make_schedule("karras", 3, x.alphas_cumprod).timesteps,
                x.alphas_cumprod)
    assert got.shape == (1, 2)
    assert main(["sample", "--model", "gmm:ring8", "--schedule", "karras", "--nfe", "5", "--solver", "heun",
                 "--eta", "0.5", "--num-seeds", "4", "--actors", "0", "--out-dir", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--eta > 0 needs --solver ddim" in err[0]
    assert not (tmp_path / "t").exists()


def test_evaluate_cross_table(tmp_path, capsys):
    """A schedule learned for one solver, run in others, next to each one's own default spacing."""
    x = load_model("gmm:ring8")
    js = tmp_path / "l.json"
    make_schedule("logsnr", 6, x.alphas_cumprod).save(js)
    out = tmp_path / "t.csv"
    assert main(["evaluate", "--model", "gmm:ring8", "--solvers", "ddim,dpmsolver++2m,heun", "--schedules", str(js),
                 "--num-seeds", "8", "--teacher-nfe", "50", "--metrics", "recon", "--out", str(out)]) == 0
    import csv

    rows = list(csv.DictReader(out.open()))
    assert [(r["solver"], r["schedule"] == "default") for r in rows] == [
        ("ddim", False), ("ddim", True), ("dpmsolver++2m", False), ("dpmsolver++2m", True), ("heun", False), ("heun", True)]
    assert rows[4]["how"] == "log-sigma interpolated 6->3 steps" and rows[4]["evals"] == "5"
    assert float(rows[0]["x_default"]) == pytest.approx(float(rows[0]["recon"]) / float(rows[1]["recon"]))


def test_cross_model_needs_allow_other_model(tmp_path, capsys):
    """A schedule exported for bundled:digits (its table's hash inside) is refused on bundled:digits-v (cosine
    betas: the same integers are other noise levels) unless --allow-other-model, which runs it and warns."""
    from search.export import export_for_model, write_export

    digits = load_model("bundled:digits")
    js = tmp_path / "d.json"
    write_export(js, export_for_model(make_schedule("quadratic", 5, digits.alphas_cumprod), digits, {}, {}))
    argv = ["evaluate", "--model", "bundled:digits-v", "--schedules", str(js), "--num-seeds", "4", "--teacher-nfe", "20",
            "--metrics", "recon"]
    assert main(argv) == 2
    assert "the same timesteps are other noise levels there" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="other noise levels"):
        assert main([*argv, "--allow-other-model"]) == 0
    assert "as is" in capsys.readouterr().out


def test_every_row_name_is_a_valid_mlflow_metric():
    """The held-out rows become MLflow metrics: every solver's reference row must have a valid name
    (MLflow refuses '+', which 'dpmsolver++2m default' holds)."""
    from mlflow.utils.validation import _validate_metric_name

    from search.sweep.holdout import REFERENCE_SUFFIX
    from search.sweep.outputs import _metric_key

    names = [s + REFERENCE_SUFFIX for s in SOLVERS] + ["learned (= dp)", "teacher (250-step DDIM)", "default"]
    keys = [_metric_key(n) for n in names]
    for k in keys:
        _validate_metric_name(k)
    assert len(set(keys)) == len(keys)
