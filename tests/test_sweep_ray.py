"""The sweep on the Ray actor pool (real local Ray) gives the same trials and numbers as in this process."""

from __future__ import annotations

import optuna
import pytest
import torch

from search.study import make_storage
from search.sweep import SweepConfig, run_sweep


def test_actor_pool_sweep_matches_in_process(ray_local, tmp_path):
    cfg = SweepConfig(model="gmm:ring8", nfe=5, trials=6, parallel=3, num_seeds=16, holdout_seeds=8,
                      baselines=("uniform", "quadratic", "dp"), teacher_nfe=50, dp_seeds=8, dp_grid=30,
                      holdout_fid=False)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {a: run_sweep(cfg, study_name=f"a{a}", out_dir=tmp_path, actors=a, track=False, figures=False,
                             log=lambda *_: None) for a in (0, 1)}
    finally:
        torch.set_num_threads(n)
    storage = make_storage(tmp_path / "optuna.journal")
    t0, t1 = (optuna.load_study(study_name=f"a{a}", storage=storage).trials for a in (0, 1))
    assert [t.state for t in t0] == [t.state for t in t1]
    assert [t.user_attrs.get("timesteps") for t in t0] == [t.user_attrs.get("timesteps") for t in t1]
    assert [t.values for t in t0] == [t.values for t in t1]
    assert [r["holdout_recon"] for r in runs[0].rows] == [r["holdout_recon"] for r in runs[1].rows]


def test_held_out_table_has_the_teacher_as_fid_floor(ray_local, tmp_path):
    """With held-out FID (the actor pool), the table ends with the teacher's row: recon exactly 0, its FID
    the floor, and every row's FID gap relative to the best baseline's."""
    # NFE 2: every 2-step schedule is far from the teacher, so the FID floor is clearly below the baselines
    cfg = SweepConfig(model="gmm:ring8", nfe=2, trials=6, parallel=3, num_seeds=16, holdout_seeds=64,
                      baselines=("uniform", "quadratic", "dp"), teacher_nfe=50, dp_seeds=8, dp_grid=30, polish=2)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = run_sweep(cfg, study_name="t", out_dir=tmp_path, actors=1, track=False, figures=True,
                        log=lambda *_: None)
    finally:
        torch.set_num_threads(n)
    teacher = res.rows[-1]
    assert teacher["schedule"] == "teacher (50-step DDIM)" and teacher["nfe"] == 50
    assert teacher["holdout_recon"] == 0.0 and teacher["fid_gap_x_best_baseline"] == 0.0
    base = min((r for r in res.rows if r["schedule"] in ("uniform", "quadratic")), key=lambda r: r["holdout_fid"])
    assert base["fid_gap_x_best_baseline"] == pytest.approx(1.0)
    learned = res.rows[0]
    want = (learned["holdout_fid"] - teacher["holdout_fid"]) / (base["holdout_fid"] - teacher["holdout_fid"])
    assert learned["fid_gap_x_best_baseline"] == pytest.approx(want)
    assert (res.out_dir / "steps.png").is_file()
    assert (res.out_dir / "holdout.png").is_file()  # recon vs FID of every row: the table has FID
