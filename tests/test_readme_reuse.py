"""The README's "Reuse a learned schedule" section: its solver table is the registry's, and its snippets run
(the diffusers one on a real DDPMPipeline with a tiny UNet; the k-diffusion one with an Euler written the
k-diffusion way, since k-diffusion is not a dependency)."""

from __future__ import annotations

import ast
import re
import types
import warnings
from pathlib import Path

import pytest
import torch

from tiny import tiny_unet

from pipeline.core.noise import make_alphas_cumprod
from pipeline.core.schedules import Schedule, karras
from pipeline.interop.apply import alphas_cumprod_sha256
from pipeline.interop.ddim_scheduler import StrideDDIMScheduler
from pipeline.solvers.registry import SOLVERS
from search.export import export_dict, write_export

ROOT = Path(__file__).resolve().parents[1]
SECTION = (ROOT / "README.md").read_text().split("## Reuse a learned schedule\n")[1].split("\n## ")[0]
BLOCKS = re.findall(r"```python\n(.*?)```", SECTION, re.S)
AC = make_alphas_cumprod("linear", 1000)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*__array__ implementation doesn't accept a copy keyword.*")
        yield


def _rows() -> dict[str, list[str]]:
    rows = {}
    for line in SECTION.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 5:
            rows[cells[0].strip("`")] = cells
    return rows


def _first_code(cell: str) -> str | None:
    m = re.search(r"`([^`]+)`", cell)
    return m.group(1) if m and not cell.startswith("—") else None


@pytest.mark.parametrize("name", list(SOLVERS))
def test_the_table_is_the_registrys(name):
    """Every registered solver has its row, with exactly its record's class, config and sampler names."""
    rows = _rows()
    assert name in rows, f"README's reuse table has no row for solver {name!r}"
    _, cls_cell, _, kd_cell, comfy_cell = rows[name]
    rec = SOLVERS[name].record()
    code = _first_code(cls_cell)
    if rec["diffusers_class"] is None:
        assert code is None, cls_cell
    else:
        node = ast.parse(code, mode="eval").body
        if isinstance(node, ast.Call):
            cls, cfg = node.func.id, {k.arg: ast.literal_eval(k.value) for k in node.keywords}
        else:
            cls, cfg = node.id, {}
        assert (cls, cfg) == (rec["diffusers_class"], rec["diffusers_config"])
    assert _first_code(kd_cell) == rec["k_diffusion"]
    assert _first_code(comfy_cell) == rec["comfyui"]


def test_the_diffusers_snippet_runs_on_a_pipeline(tmp_path, monkeypatch):
    from diffusers import DDPMPipeline, DDPMScheduler

    # A DDPM checkpoint that clips x0, as google/ddpm-* ship; saved and loaded as a user's would be.
    DDPMPipeline(unet=tiny_unet(out_scale=50.0), scheduler=DDPMScheduler(clip_sample=True)).save_pretrained(tmp_path / "p")
    pipe = DDPMPipeline.from_pretrained(tmp_path / "p")
    pipe.set_progress_bar_config(disable=True)
    s = karras(6, AC)
    tuned = Schedule(s.timesteps, 1000, "learned", {}, {"solver": SOLVERS["ddim"].record()})
    write_export(tmp_path / "schedule.json", export_dict(tuned, model="tiny", sigmas=s.sigmas(AC).tolist(),
                                                        alphas_hash=alphas_cumprod_sha256(AC)))
    monkeypatch.chdir(tmp_path)
    ns = {"pipe": pipe}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*tuned for.*")  # the recorded solver: no mismatch warning
        exec(compile(BLOCKS[0], "README.md", "exec"), ns)
    assert type(pipe.scheduler) is StrideDDIMScheduler and pipe.scheduler.timesteps.tolist() == list(s.timesteps)
    assert len(ns["images"]) == 1


def _sample_euler(model, x, sigmas, extra_args=None):
    """Euler in sigma (Karras et al. 2022, Alg. 1 without churn), with k-diffusion's signature."""
    for i in range(len(sigmas) - 1):
        d = (x - model(x, sigmas[i])) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def test_the_k_diffusion_snippet_runs_and_is_ddim():
    from pipeline.models.denoisers import gaussian_mixture
    from pipeline.solvers.ddim import ddim_sample

    mix = gaussian_mixture("ring8", AC)
    sched = Schedule(karras(8, AC).timesteps, 1000, "learned", {}, {"solver": SOLVERS["ddim"].record()})

    def model(x, sigma):  # k-diffusion's denoiser contract: D(x, sigma) = x - sigma * eps(x / sqrt(1 + sigma^2))
        abar = torch.full((x.shape[0],), 1 / (1 + float(sigma) ** 2), dtype=torch.float64)
        return x - sigma * mix.eps_at_abar(x * abar.sqrt()[:, None], abar)

    torch.manual_seed(0)
    ns = {"sched": sched, "alphas_cumprod": AC, "model": model, "shape": (16, 2), "torch": torch,
          "k_diffusion": types.SimpleNamespace(sampling=types.SimpleNamespace(sample_euler=_sample_euler))}
    exec(compile(BLOCKS[1], "README.md", "exec"), ns)
    torch.manual_seed(0)
    x_T = torch.randn(16, 2)  # the snippet's draw; VP x_T = x / sqrt(1 + sigma_max^2)
    sig0 = ns["sigmas"][0].double()
    ref = ddim_sample(lambda x, t: mix.eps_at_abar(x, AC[t].double()), x_T.double() * sig0 / (1 + sig0**2).sqrt(),
                      sched.timesteps, AC)
    torch.testing.assert_close(ns["x0"].double(), ref, atol=1e-4, rtol=0)
