""""Bit-identical on any number of actors / at any batch size", proven on a UNet (the bundled digits DDPM),
not on an analytic mixture: a gmm model gives the same bits at any batch split even without the fixed-shape
micro-batching (`pipeline.core.batching`), the UNet does not (~1e-5 apart).

`sample`, `evaluate` and `sweep` run through the CLI with their default flags (only sizes changed), at 0,
1 and 3 actors; seed counts are chosen so 3 actors get uneven shards. Outputs must be equal, not close.
"""

from __future__ import annotations

import csv

import optuna
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from search.study import make_storage

MODEL = "bundled:digits"
ACTORS = (0, 1, 3)


@pytest.fixture(autouse=True)
def _ray(ray_local):  # one local Ray for the session (conftest.py); the CLIs use it
    yield


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_sample_bit_identical_for_0_1_3_actors_and_any_batch_size(tmp_path):
    # 50 samples: 3 actors at --batch-size 17 get 17 + 17 + 16; eta > 0 adds per-sample noise in every step.
    base = ["sample", "--model", MODEL, "--schedule", "karras", "--nfe", "5", "--num-seeds", "50", "--eta", "0.3",
            "--seed", "11", "--no-progress"]
    runs = {"a0": [], "a1": [], "a3b17": ["--batch-size", "17"]}
    for name, extra in runs.items():
        actors = name[1]
        assert main(base + ["--actors", actors, "--out-dir", str(tmp_path / name), *extra]) == 0
    tables = {name: pq.read_table(tmp_path / name / "samples.parquet") for name in runs}
    ref = tables.pop("a0")
    assert ref.num_rows == 50 and ref.column("seed").to_pylist() == list(range(11, 61))
    for name, t in tables.items():
        assert t.column("seed").to_pylist() == ref.column("seed").to_pylist(), name
        assert t.column("sample").to_pylist() == ref.column("sample").to_pylist(), name  # every float, exactly


def test_evaluate_table_identical_for_0_1_3_actors(tmp_path, capsys):
    # 50 seeds over 3 actors: 17 + 17 + 16. recon and inversion, the defaults.
    base = ["evaluate", "--model", MODEL, "--schedules", "uniform,karras,logsnr", "--nfe", "5", "--num-seeds", "50",
            "--teacher-nfe", "20"]
    tables = {}
    for a in ACTORS:
        assert main(base + ["--actors", str(a), "--out", str(tmp_path / f"a{a}.csv")]) == 0
        tables[a] = _csv(tmp_path / f"a{a}.csv")
    capsys.readouterr()
    assert len(tables[0]) == 3 and all(float(r["recon"]) > 0 for r in tables[0])
    for a in ACTORS[1:]:
        assert tables[a] == tables[0], a  # every column, as written (repr of the float)


def _sweep_args(tmp_path, actors: int) -> list[str]:
    """The default `stridelab sweep` on the bundled model, sizes cut down (16 + 20 seeds: uneven over 3 actors)."""
    return ["sweep", "--trials", "7", "--polish", "2", "--num-seeds", "16", "--holdout-seeds", "20",
            "--teacher-nfe", "20", "--schedules", "uniform,karras,logsnr", "--no-mlflow",
            "--storage", str(tmp_path / "optuna.journal"), "--study-name", f"a{actors}", "--out-dir", str(tmp_path),
            "--actors", str(actors)]


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """actors -> (trials, held-out table) of the cut-down default sweep; each sweep run once per module."""
    tmp, done = tmp_path_factory.mktemp("sweeps"), {}

    def get(actors: int):
        if actors not in done:
            assert main(_sweep_args(tmp, actors)) == 0
            study = optuna.load_study(study_name=f"a{actors}", storage=make_storage(tmp / "optuna.journal"))
            done[actors] = (study.trials, _csv(tmp / f"a{actors}" / "comparison.csv"))
        return done[actors]

    return get


def _same_sweep(got, ref):
    (t_got, held_got), (t_ref, held_ref) = got, ref
    assert len(t_ref) == 7
    assert [t.state for t in t_got] == [t.state for t in t_ref]
    assert [t.user_attrs.get("timesteps") for t in t_got] == [t.user_attrs.get("timesteps") for t in t_ref]
    assert [t.user_attrs.get("recon_per_seed") for t in t_got] == [t.user_attrs.get("recon_per_seed") for t in t_ref]
    assert [t.values for t in t_got] == [t.values for t in t_ref]
    assert len(held_ref) >= 4
    recon = [(r["schedule"], r["timesteps"], r["holdout_recon"], r["x_best_baseline"]) for r in held_ref]
    assert [(r["schedule"], r["timesteps"], r["holdout_recon"], r["x_best_baseline"]) for r in held_got] == recon


@pytest.mark.slow
def test_sweep_trials_and_holdout_recon_identical_on_1_and_3_actors(sweeps, capsys):
    _same_sweep(sweeps(3), sweeps(1))
    capsys.readouterr()


@pytest.mark.slow
def test_sweep_holdout_fid_identical_on_1_and_3_actors(sweeps, capsys):
    _same_sweep(sweeps(3), sweeps(1))
    got, ref = sweeps(3)[1], sweeps(1)[1]
    capsys.readouterr()
    assert [r["holdout_fid"] for r in got] == [r["holdout_fid"] for r in ref]


@pytest.mark.slow
def test_sweep_in_process_identical_to_actors(sweeps, capsys):
    """--actors 0 runs the schedules in this process (InProcessEvaluator, FID through an in-process pool),
    with the same fixed network batch as the actors: every trial and held-out number is the actors' own."""
    _same_sweep(sweeps(0), sweeps(1))
    capsys.readouterr()
    assert [r["holdout_fid"] for r in sweeps(0)[1]] == [r["holdout_fid"] for r in sweeps(1)[1]]
