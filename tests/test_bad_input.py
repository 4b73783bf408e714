"""Bad input catalogue: every case is a real ``python -m jobs.cli ...`` subprocess in its own empty
directory, and must end with

- a non-zero exit code (2) and no traceback,
- exactly one line on stderr (argparse may print its usage, possibly wrapped, before its one error line),
  naming what is wrong,
- no output file: the ``--out`` path does not exist and the directory holds only the case's inputs.

Cases: schedule files (non-monotonic, duplicates, out of range, NaN, wrong types, empty, truncated or not
JSON, a directory, ...), CLI flags (NFE 0 or > T, eta outside [0, 1], unknown schedule / sampler / space /
objective names, negative counts, bad --actors), model specs and configs (missing directory, unknown
scheme, corrupt safetensors, pickle-only weights, broken scheduler config), and stores (a study or run
that does not exist). The subprocesses of the selected cases run three at a time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# The module fixture runs every case (three subprocesses at a time) inside the first test: on a busy 2-core
# box ~110 cases take longer than the suite-wide 600 s per test.
pytestmark = pytest.mark.timeout(2400)

ROOT = Path(__file__).resolve().parents[1]
T = 1000  # gmm:ring8's training timesteps


def sched(timesteps, **kw) -> str:
    return json.dumps({"name": "custom", "num_train_timesteps": T, "timesteps": timesteps, **kw})


UNET_CONFIG = json.dumps({"_class_name": "UNet2DModel", "sample_size": 8, "in_channels": 1, "out_channels": 1,
                          "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8,
                          "down_block_types": ["DownBlock2D", "DownBlock2D"],
                          "up_block_types": ["UpBlock2D", "UpBlock2D"]})
SCHED_CONFIG = json.dumps({"_class_name": "DDPMScheduler", "num_train_timesteps": T, "beta_schedule": "linear"})


@dataclass(frozen=True)
class Case:
    """argv after ``python -m jobs.cli``; `files`: inputs to create (str/bytes content, or None for a
    directory); `needle`: part of the error line; `out`: the output path that must not appear."""

    id: str
    argv: tuple[str, ...]
    needle: str
    files: dict[str, str | bytes | None] = field(default_factory=dict)
    out: str | None = None


def evaluate_file(name: str) -> tuple[str, ...]:
    return ("evaluate", "--model", "gmm:ring8", "--schedules", name, "--nfe", "3", "--num-seeds", "4",
            "--teacher-nfe", "10", "--out", "table.csv")


def sample(*extra: str) -> tuple[str, ...]:
    return ("sample", "--model", "gmm:ring8", "--num-seeds", "4", "--actors", "0", "--no-progress",
            "--out-dir", "samples", *extra)


def sweep(*extra: str) -> tuple[str, ...]:
    return ("sweep", "--model", "gmm:ring8", "--nfe", "5", "--trials", "4", "--schedules", "uniform,karras",
            "--polish", "0", "--num-seeds", "16", "--holdout-seeds", "4", "--teacher-nfe", "20", "--no-holdout-fid",
            "--out-dir", "results", "--storage", "results/optuna.journal", "--tracking-uri", "sqlite:///mlflow.db",
            "--actors", "0", *extra)


def ui(*extra: str) -> tuple[str, ...]:
    return ("ui", "--tracking-uri", "sqlite:///mlflow.db", "--print-command", *extra)


GOOD_SCHEDULE = {"s.json": sched([900, 500, 0])}


MODEL_DIR = {"m/config.json": UNET_CONFIG, "m/scheduler_config.json": SCHED_CONFIG}

CASES = [
    # -- schedule files ------------------------------------------------------------------------------
    Case("sched-not-decreasing", evaluate_file("s.json"), "not decreasing", {"s.json": sched([500, 700, 0])}, "table.csv"),
    Case("sched-duplicate", evaluate_file("s.json"), "duplicate", {"s.json": sched([500, 500, 0])}, "table.csv"),
    Case("sched-out-of-range-high", evaluate_file("s.json"), "out of range", {"s.json": sched([1000, 500, 0])}, "table.csv"),
    Case("sched-nan", evaluate_file("s.json"), "NaN", {"s.json": '{"num_train_timesteps": 1000, "timesteps": [900, NaN, 0]}'},
         "table.csv"),
    Case("sched-string-entry", evaluate_file("s.json"), "not an integer", {"s.json": sched([900, "500", 0])}, "table.csv"),
    Case("sched-empty-list", evaluate_file("s.json"), "empty", {"s.json": sched([])}, "table.csv"),
    Case("sched-empty-file", evaluate_file("s.json"), "invalid schedule JSON", {"s.json": ""}, "table.csv"),
    Case("sched-truncated-json", evaluate_file("s.json"), "invalid schedule JSON", {"s.json": sched([900, 500, 0])[:30]},
         "table.csv"),
    Case("sched-not-json", evaluate_file("s.json"), "invalid schedule JSON", {"s.json": "timesteps: 900 500 0\n"}, "table.csv"),
    Case("sched-binary", evaluate_file("s.json"), "not a UTF-8", {"s.json": b"\xff\xfe\x00\x81garbage"}, "table.csv"),
    Case("sched-is-a-directory", evaluate_file("s.json"), "not found", {"s.json": None}, "table.csv"),
    Case("sched-other-T", evaluate_file("s.json"), "T = 500", {"s.json": json.dumps({"num_train_timesteps": 500,
                                                                                    "timesteps": [400, 0]})}, "table.csv"),
    Case("sample-sched-duplicate", sample("--schedule", "s.json"), "duplicate", {"s.json": sched([500, 500, 0])}, "samples"),
    # -- CLI flags ------------------------------------------------------------------------------------
    Case("evaluate-nfe-0", ("evaluate", "--model", "gmm:ring8", "--nfe", "0", "--out", "table.csv"), "nfe must be an integer in [1, 1000]",
         out="table.csv"),
    Case("evaluate-nfe-above-T", ("evaluate", "--model", "gmm:ring8", "--nfe", "5,1001", "--out", "table.csv"), "got 1001", out="table.csv"),
    Case("evaluate-unknown-schedule", ("evaluate", "--model", "gmm:ring8", "--schedules", "uniform,cosine", "--out", "table.csv"),
         "unknown schedule 'cosine'", out="table.csv"),
    Case("evaluate-bad-actors", ("evaluate", "--model", "gmm:ring8", "--actors", "-2", "--out", "table.csv"), "--actors", out="table.csv"),
    Case("sample-eta-above-1", sample("--schedule", "uniform", "--nfe", "5", "--eta", "1.5"), "eta must be in [0, 1]",
         out="samples"),
    Case("sample-eta-negative", sample("--schedule", "uniform", "--nfe", "5", "--eta", "-0.1"), "eta must be in [0, 1]",
         out="samples"),
    Case("sample-eta-nan", sample("--schedule", "uniform", "--nfe", "5", "--eta", "nan"), "eta must be in [0, 1]",
         out="samples"),
    Case("sweep-nfe-above-T", sweep("--nfe", "1001"), "nfe must be an integer in [1, 1000]", out="results"),
    Case("sweep-unknown-sampler", sweep("--optuna-sampler", "sgd"), "unknown sampler 'sgd'", out="results"),
    Case("sweep-unknown-space", sweep("--space", "spline"), "unknown search space 'spline'", out="results"),
    Case("sweep-unknown-solver", sweep("--solver", "plms"), "--solver must be one of ddim, euler", out="results"),
    Case("evaluate-unknown-solver", ("evaluate", "--model", "gmm:ring8", "--solvers", "ddim,plms", "--out", "table.csv"),
         "--solvers must be one of ddim, euler", out="table.csv"),
    Case("sample-unknown-solver", sample("--schedule", "uniform", "--nfe", "5", "--solver", "lms"),
         "--solver must be one of ddim, euler", out="samples"),
    Case("sample-eta-deterministic-solver", sample("--schedule", "uniform", "--nfe", "5", "--solver", "unipc", "--eta", "0.5"),
         "--eta > 0 needs --solver ddim", out="samples"),
    Case("sweep-unknown-objective", sweep("--objective", "lpips"), "unknown objective 'lpips'", out="results"),
    Case("sweep-negative-trials", sweep("--trials", "-1"), "--trials", out="results"),
    Case("sweep-bad-actors", sweep("--actors", "-1"), "--actors", out="results"),
    Case("sweep-trials-not-int", sweep("--trials", "ten"), "invalid int value", out="results"),
    Case("sweep-polish-negative", sweep("--polish", "-1"), "--polish must be an integer >= 0", out="results"),
    Case("sweep-gpus-without-actors", sweep("--gpus-per-actor", "1"), "--gpus-per-actor needs Ray actors",
         out="results"),
    Case("sample-gpus-zero", sample("--schedule", "uniform", "--nfe", "5", "--gpus-per-actor", "0"),
         "--gpus-per-actor must be in (0, 8]", out="samples"),
    Case("sweep-actor-resources-not-json", sweep("--actors", "2", "--actor-resources", "gpu_node"),
         "--actor-resources must be a JSON object", out="results"),
    Case("sweep-actor-resources-cpu", sweep("--actors", "2", "--actor-resources", '{"CPU": 1}'),
         "--actor-resources names custom resources only, got 'CPU'", out="results"),
    Case("sample-actor-resources-zero", sample("--schedule", "uniform", "--nfe", "5", "--actor-resources", '{"n": 0}'),
         "--actor-resources amounts must be numbers > 0", out="samples"),
    Case("evaluate-actor-resources-without-actors", ("evaluate", "--model", "gmm:ring8", "--actor-resources", '{"n": 1}',
                                                     "--out", "table.csv"),
         "--actor-resources needs Ray actors", out="table.csv"),
    Case("sweep-placement-timeout-negative", sweep("--placement-timeout", "-5"),
         "--placement-timeout must be a number of seconds >= 0", out="results"),
    # -- model specs and configs ----------------------------------------------------------------------
    Case("model-missing-dir", ("evaluate", "--model", "no/such/dir", "--out", "table.csv"), "does not exist", out="table.csv"),
    Case("model-unknown-scheme", ("evaluate", "--model", "foo:bar", "--out", "table.csv"), "unknown model spec scheme",
         out="table.csv"),
    Case("model-corrupt-safetensors", ("evaluate", "--model", "m", "--out", "table.csv"), "corrupt safetensors",
         {**MODEL_DIR, "m/diffusion_pytorch_model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json"}, "table.csv"),
    Case("model-pickle-only", ("evaluate", "--model", "m", "--out", "table.csv"), "no pickle",
         {**MODEL_DIR, "m/diffusion_pytorch_model.bin": b"\x80\x04K\x01."}, "table.csv"),
    Case("model-bad-scheduler-config", ("evaluate", "--model", "m", "--out", "table.csv"), "cannot read",
         {"m/config.json": UNET_CONFIG, "m/scheduler_config.json": "{not json"}, "table.csv"),
    # -- stores ----------------------------------------------------------------------------------------
    Case("sweep-resume-missing-study", sweep("--resume", "--study-name", "nope"), "no study named 'nope'", out="results"),
    Case("export-missing-study", ("export", "--study-name", "nope", "--storage", "results/optuna.journal", "--out", "s.json"),
         "no study named 'nope'", out="s.json"),
    Case("export-missing-run", ("export", "--run", "0123456789abcdef", "--tracking-uri", "sqlite:///mlflow.db",
                                "--out", "s.json"), "0123456789abcdef", out="s.json"),
    Case("ui-bad-port", ("ui", "--port", "70000", "--print-command"), "--port"),
    # -- one past each edge of every validated range (the edges themselves: EDGES below) ----------------
    Case("evaluate-num-seeds-0", evaluate_file("s.json") + ("--num-seeds", "0"), "--num-seeds must be >= 1",
         GOOD_SCHEDULE, "table.csv"),
    Case("evaluate-teacher-nfe-above-T", evaluate_file("s.json") + ("--teacher-nfe", "1001"), "got 1001",
         GOOD_SCHEDULE, "table.csv"),
    Case("evaluate-teacher-nfe-negative", evaluate_file("s.json") + ("--teacher-nfe", "-1"), "got -1",
         GOOD_SCHEDULE, "table.csv"),
    Case("sample-nfe-0", sample("--schedule", "uniform", "--nfe", "0"), "nfe must be an integer in [1, 1000]", out="samples"),
    Case("sample-nfe-above-T", sample("--schedule", "uniform", "--nfe", "1001"), "got 1001", out="samples"),
    Case("sample-eta-just-above-1", sample("--schedule", "uniform", "--nfe", "5", "--eta", "1.000001"),
         "eta must be in [0, 1]", out="samples"),
    Case("sample-eta-just-below-0", sample("--schedule", "uniform", "--nfe", "5", "--eta=-1e-9"),
         "eta must be in [0, 1]", out="samples"),
    Case("sample-num-seeds-0", sample("--schedule", "uniform", "--nfe", "5", "--num-seeds", "0"), "--num-seeds must be >= 1",
         out="samples"),
    Case("sample-batch-size-0", sample("--schedule", "uniform", "--nfe", "5", "--batch-size", "0"),
         "--batch-size must be >= 1", out="samples"),
    Case("sample-seed-negative", sample("--schedule", "uniform", "--nfe", "5", "--seed", "-1"), "--seed must be >= 0",
         out="samples"),
    Case("sample-actors-negative", sample("--schedule", "uniform", "--nfe", "5", "--actors", "-1"), "--actors must be >= 0",
         out="samples"),
    Case("sample-gpus-above-8", sample("--schedule", "uniform", "--nfe", "5", "--actors", "1", "--gpus-per-actor", "8.01"),
         "--gpus-per-actor must be in (0, 8]", out="samples"),
    Case("sample-out-under-a-file", ("sample", "--model", "gmm:ring8", "--schedule", "uniform", "--nfe", "3",
                                     "--num-seeds", "4", "--actors", "0", "--no-progress", "--out-dir", "/dev/null/x"),
         "/dev/null is not a directory"),
    Case("sweep-nfe-0", sweep("--nfe", "0"), "--nfe must be an integer >= 1", out="results"),
    Case("sweep-trials-0", sweep("--trials", "0"), "--trials must be >= 1", out="results"),
    Case("sweep-parallel-0", sweep("--parallel", "0"), "--parallel must be >= 1", out="results"),
    Case("sweep-num-seeds-1", sweep("--num-seeds", "1"), "--num-seeds must be in [2, 1000000)", out="results"),
    Case("sweep-num-seeds-offset", sweep("--num-seeds", "1000000"), "--num-seeds must be in [2, 1000000)", out="results"),
    Case("sweep-holdout-seeds-0", sweep("--holdout-seeds", "0"), "--holdout-seeds must be in [1, 1000000)", out="results"),
    Case("sweep-holdout-seeds-offset", sweep("--holdout-seeds", "1000000"), "--holdout-seeds must be in [1, 1000000)",
         out="results"),
    Case("sweep-validation-seeds-negative", sweep("--validation-seeds", "-1"),
         "--validation-seeds must be an integer in [0, 1000000)", out="results"),
    Case("sweep-screen-seeds-negative", sweep("--screen-seeds", "-1"), "--screen-seeds must be in [0, 16)", out="results"),
    Case("sweep-screen-seeds-all", sweep("--screen-seeds", "16"), "--screen-seeds must be in [0, 16)", out="results"),
    Case("sweep-trials-below-warm-starts", sweep("--trials", "1"), "--trials (1) must cover the 2 warm-start trials",
         out="results"),
    Case("ui-port-0", ui("--port", "0"), "--port must be in 1..65535"),
    Case("ui-port-65536", ui("--port", "65536"), "--port must be in 1..65535"),
]

# Control cases: the base commands above succeed as given, so each case fails for its own reason only.
# Edges: the smallest and largest accepted value of every range checked on the command line pass.
GOOD = [
    Case("control-evaluate", evaluate_file("s.json"), "", GOOD_SCHEDULE, "table.csv"),
    Case("control-sample", sample("--schedule", "uniform", "--nfe", "5"), "", out="samples"),
    Case("control-sweep", sweep(), "", out="results"),
    Case("control-ui", ui(), "mlflow"),
    Case("edge-evaluate-nfe-1", evaluate_file("s.json") + ("--nfe", "1"), "", GOOD_SCHEDULE, "table.csv"),
    Case("edge-evaluate-nfe-T", evaluate_file("uniform") + ("--nfe", "1000", "--teacher-nfe", "1000", "--num-seeds", "1"),
         "", out="table.csv"),
    Case("edge-evaluate-teacher-nfe-0-all", evaluate_file("s.json") + ("--teacher-nfe", "0", "--num-seeds", "1"), "",
         GOOD_SCHEDULE, "table.csv"),
    Case("edge-sample-eta-0", sample("--schedule", "uniform", "--nfe", "1", "--eta", "0", "--num-seeds", "1",
                                     "--batch-size", "1", "--seed", "0", "--actors", "0"), "", out="samples"),
    Case("edge-sample-eta-1", sample("--schedule", "uniform", "--nfe", "1000", "--eta", "1"), "", out="samples"),
    Case("edge-ui-port-1", ui("--port", "1"), "--port 1"),
    Case("edge-ui-port-65535", ui("--port", "65535"), "--port 65535"),
]


def _tree(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def _run(case: Case, d: Path) -> tuple[subprocess.CompletedProcess, set[str], set[str]]:
    for name, content in case.files.items():
        p = d / name
        if content is None:
            p.mkdir(parents=True)
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = _tree(d)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "jobs.cli", *case.argv], cwd=d, env=env, capture_output=True,
                       text=True, timeout=300)
    return r, before, _tree(d)


@pytest.fixture(scope="module")
def results(request, tmp_path_factory):
    """Run the subprocesses of every selected case of this module, three at a time, once."""
    wanted = {item.callspec.params["case"].id for item in request.session.items
              if item.module is request.module and hasattr(item, "callspec") and "case" in item.callspec.params}
    todo = [c for c in CASES + GOOD if c.id in wanted]
    with ThreadPoolExecutor(max_workers=3) as ex:
        futs = {c.id: ex.submit(_run, c, tmp_path_factory.mktemp(c.id)) for c in todo}
        return {k: f.result() for k, f in futs.items()}


def test_catalogue_is_large_and_unique():
    assert len(CASES) >= 20 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_one_line_nonzero_no_traceback_no_output(results, case):
    r, before, after = results[case.id]
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    if lines and lines[0].startswith("usage:"):  # argparse: usage (wrapped lines are indented), then one error
        lines = [ln for ln in lines[1:] if not ln.startswith(" ")]
    assert len(lines) == 1, r.stderr
    assert "error:" in lines[0] and case.needle in lines[0], lines[0]
    assert after == before, f"new files: {sorted(after - before)}"
    if case.out:
        assert case.out not in after


@pytest.mark.parametrize("case", GOOD, ids=[c.id for c in GOOD])
def test_controls_and_edges_succeed(results, case):
    r, before, after = results[case.id]
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])
    assert case.needle in r.stdout
    if case.out:
        assert case.out in after


def test_sweep_ranges_accept_both_edges():
    """The sweep's own ranges: both edges pass validation (running a sweep at each would take minutes)."""
    from search.sweep import HOLDOUT_OFFSET, SweepConfig

    base = dict(model="gmm:ring8", nfe=1, trials=1, parallel=1, baselines=("uniform",), polish=0, holdout_seeds=1)
    for num_seeds, screen_seeds in ((2, 0), (2, 1), (HOLDOUT_OFFSET - 1, HOLDOUT_OFFSET - 2)):
        SweepConfig(**base, num_seeds=num_seeds, screen_seeds=screen_seeds)


def test_gpus_per_actor_accepts_both_edges():
    """(0, 8]: 8 and the smallest positive request pass; 0 and 8.01 are the rejected cases above."""
    from pipeline.distributed import check_gpus_per_actor

    for gpus in (1e-9, 8):
        check_gpus_per_actor(gpus, 1)
