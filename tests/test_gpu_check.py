"""benchmarks/gpu_check.py on the CPU: the no-CUDA path (one line, exit 0, docs/GPU.md untouched), the table
rendering, and the same measurement functions the CUDA path runs, at tiny sizes with device="cpu"."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA path")
def test_without_cuda_one_line_exit_0_and_no_file(tmp_path):
    doc = ROOT / "docs" / "GPU.md"
    before = doc.read_bytes()
    out = tmp_path / "GPU.md"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(out)],
                       capture_output=True, text=True, timeout=120, env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no CUDA device here (torch ") and "nothing measured" in lines[0]
    assert not out.exists() and doc.read_bytes() == before
    # the default --out is docs/GPU.md: the in-process call leaves it alone too
    assert gpu_check.main([]) == 0 and doc.read_bytes() == before


def test_render_gpu_md_marks_failures_and_figures():
    meta = {"machine": "Fake GPU x 1", "torch": "9.9", "CUDA": "12.0", "date": "2030-01-01 00:00 UTC"}
    rows = [{"check": "cuda vs cpu fp32, max abs", "model": "bundled:digits", "dtype": "bfloat16", "batch": 256,
             "value": "3.00e-02", "target": "< 0.25", "ok": True},
            {"check": "images/s: ddim_sample / raw UNet", "model": "m", "dtype": "float16", "batch": 512,
             "value": "90 / 100 = 0.900", "target": ">= 0.95", "ok": False},
            {"check": "actor pool samples/s", "value": "1234", "ok": None}]
    text = gpu_check.render_gpu_md(meta, rows)
    assert "- machine: Fake GPU x 1" in text and "- CUDA: 12.0" in text
    assert "| cuda vs cpu fp32, max abs | bundled:digits | bfloat16 | 256 | 3.00e-02 | < 0.25 | yes |" in text
    assert "| 90 / 100 = 0.900 | >= 0.95 | **no** |" in text
    assert "| actor pool samples/s | - | - | - | 1234 | - | - |" in text
    assert "FAILED: images/s: ddim_sample / raw UNet" in text
    assert "all checks pass" in gpu_check.render_gpu_md(meta, rows[:1])


def test_cifar10_unet_has_about_35_7_m_parameters():
    assert abs(gpu_check.num_params(gpu_check.cifar10_unet()) - 35.7e6) < 0.1e6


def test_measurement_functions_run_on_the_cpu_at_tiny_sizes():
    from pipeline.models.load import load_model

    m = load_model("bundled:digits")
    r = gpu_check.unet_vs_ddim(m.denoiser.model, m.alphas_cumprod, m.sample_shape, "cpu", "float32", 8, 2, reps=1)
    assert r["raw_ips"] > 0 and r["ddim_ips"] > 0 and 0 < r["ratio"] < 10
    b, _ = gpu_check.best_batch(m.denoiser.model, m.alphas_cumprod, m.sample_shape, "cpu", "float32", (4, 8), 2,
                                deadline=0.0)  # past the deadline: stops after the first size
    assert b == 4
    assert gpu_check.device_vs_cpu("bundled:digits", "cpu", "float32", range(8), 3) == 0.0
    assert 0 < gpu_check.device_vs_cpu("bundled:digits", "cpu", "bfloat16", range(8), 3) < gpu_check.TOLERANCE["bfloat16"]
    assert gpu_check.identical_across_batches("bundled:digits", "cpu", "float32", range(10), 2, (1, 3))
