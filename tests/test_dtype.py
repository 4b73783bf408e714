"""`--dtype`: the network runs in float32, bfloat16 or float16 while the sampler's state stays float32 (its
coefficients float64); on the CPU, bf16 and fp16 samples of the bundled digits model stay within the stated
tolerances of float32's; a dtype outside the list is one line, exit 2, on every subcommand that takes it."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from jobs.cli import main
from pipeline.core.schedules import make_schedule
from pipeline.distributed import SamplerWorker
from pipeline.errors import StridelabError
from pipeline.models.load import DTYPES, load_model, model_dtype
from search.sweep import SweepConfig

SEEDS = list(range(64))

# Measured on the CPU (torch 2.x, 64 seeds, uniform NFE 10 DDIM, samples in [-1.6, 1.6]): bf16 max |diff| 0.076,
# RMS 0.0078; fp16 max 0.014, RMS 0.0013. The bounds leave about 3x room; a broken cast (e.g. eps left in
# bf16 and stepped there, or a wrong output scale) lands far outside them.
TOLERANCE = {"bfloat16": {"max": 0.25, "rms": 0.025}, "float16": {"max": 0.05, "rms": 0.005}}


@pytest.fixture(scope="module")
def fp32_samples():
    w = SamplerWorker("bundled:digits", device="cpu", dtype="float32")
    ts = make_schedule("uniform", 10, w.model.alphas_cumprod).timesteps
    return ts, w.sample(SEEDS, ts)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_samples_stay_within_the_stated_tolerance_of_float32(fp32_samples, dtype):
    ts, ref = fp32_samples
    w = SamplerWorker("bundled:digits", device="cpu", dtype=dtype)
    assert next(w.model.denoiser.model.parameters()).dtype == getattr(torch, dtype)  # the network really is half
    x = w.sample(SEEDS, ts)
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    d = x - ref
    max_diff, rms = d.abs().max().item(), d.pow(2).mean().sqrt().item()
    assert 1e-4 < max_diff < TOLERANCE[dtype]["max"], max_diff  # > 1e-4: not silently float32
    assert rms < TOLERANCE[dtype]["rms"], rms


def test_the_dtype_policy_is_one_list():
    assert DTYPES == ("float32", "bfloat16", "float16")
    assert [model_dtype(n) for n in DTYPES] == [torch.float32, torch.bfloat16, torch.float16]
    assert model_dtype(torch.bfloat16) is torch.bfloat16
    for bad in ("float64", "half", torch.float64):
        with pytest.raises(StridelabError, match="must be one of float32, bfloat16, float16"):
            model_dtype(bad)
    with pytest.raises(StridelabError, match="dtype"):
        load_model("bundled:digits", dtype="int8")
    with pytest.raises(StridelabError, match="dtype"):
        SweepConfig(dtype="float64")
    assert SweepConfig(dtype="bfloat16").dtype == "bfloat16"


def test_sample_cli_runs_the_network_in_bf16_and_records_it(tmp_path, capsys):
    argv = ["sample", "--schedule", "uniform", "--nfe", "5", "--num-seeds", "6", "--actors", "0", "--no-progress"]
    assert main(argv + ["--out-dir", str(tmp_path / "fp32")]) == 0
    assert main(argv + ["--out-dir", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    assert "bfloat16" in capsys.readouterr().out
    a, b = pq.read_table(tmp_path / "fp32" / "samples.parquet"), pq.read_table(tmp_path / "bf16" / "samples.parquet")
    assert json.loads(a.schema.metadata[b"stridelab"])["model_dtype"] == "float32"
    meta = json.loads(b.schema.metadata[b"stridelab"])
    assert meta["model_dtype"] == "bfloat16" and meta["dtype"] == "float32"  # the column stays float32
    xa = torch.tensor(a.column("sample").to_pylist())
    xb = torch.tensor(b.column("sample").to_pylist())
    assert 0 < (xa - xb).abs().max().item() < TOLERANCE["bfloat16"]["max"]


def test_evaluate_cli_passes_the_dtype_to_its_workers(tmp_path):
    argv = ["evaluate", "--num-seeds", "8", "--teacher-nfe", "20", "--nfe", "5", "--schedules", "uniform",
            "--actors", "0", "--no-progress"]
    assert main(argv + ["--out", str(tmp_path / "a.csv")]) == 0
    assert main(argv + ["--out", str(tmp_path / "b.csv"), "--dtype", "bfloat16"]) == 0
    import csv

    ra = [r for r in csv.DictReader(open(tmp_path / "a.csv")) if r["schedule"] == "uniform"][0]
    rb = [r for r in csv.DictReader(open(tmp_path / "b.csv")) if r["schedule"] == "uniform"][0]
    assert ra["recon"] != rb["recon"]  # the workers ran another network dtype ...
    assert float(rb["recon"]) == pytest.approx(float(ra["recon"]), rel=0.3)  # ... and it is the same model


@pytest.mark.parametrize("argv", [
    ["sample", "--schedule", "uniform", "--nfe", "5", "--num-seeds", "4", "--actors", "0"],
    ["evaluate", "--num-seeds", "4", "--nfe", "5", "--actors", "0"],
    ["sweep", "--nfe", "5", "--trials", "8", "--actors", "0", "--no-mlflow"],
])
def test_an_unknown_dtype_is_one_line_exit_2_and_no_output(tmp_path, cli_stderr, argv):
    flag, out = {"sample": ("--out-dir", "out"), "evaluate": ("--out", "t.csv"), "sweep": ("--out-dir", "out")}[argv[0]]
    out = tmp_path / out
    assert main(argv + [flag, str(out), "--dtype", "float64"]) == 2
    err = cli_stderr()
    assert len(err) == 1 and "--dtype must be one of float32, bfloat16, float16" in err[0], err
    assert list(tmp_path.iterdir()) == []
