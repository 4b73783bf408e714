"""The README's "Reuse a learned schedule" section: its solver table is the registry's, and its snippets run
as written (the diffusers one on a real DDPMPipeline with a tiny UNet, for every solver with a diffusers twin,
checking the timesteps the UNet is actually called with; the k-diffusion one with an Euler written the
k-diffusion way, since k-diffusion is not a dependency). `sample_with_schedule` also on a tiny Stable
Diffusion pipeline, which takes timesteps= and sigmas=."""

from __future__ import annotations

import ast
import re
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

import test_models
from tiny import tiny_unet

from pipeline.core.noise import make_alphas_cumprod
from pipeline.errors import StridelabError
from pipeline.core.schedules import Schedule, karras
from pipeline.interop.apply import alphas_cumprod_sha256
from pipeline.interop.ddim_scheduler import StrideDDIMScheduler
from pipeline.solvers.registry import SOLVERS
from search.export import export_dict, write_export

ROOT = Path(__file__).resolve().parents[1]
SECTION = (ROOT / "README.md").read_text().split("## Reuse a learned schedule\n")[1].split("\n## ")[0]
BLOCKS = re.findall(r"```python\n(.*?)```", SECTION, re.S)
AC = make_alphas_cumprod("linear", 1000)
sd_dir = test_models.sd_dir  # the tiny Stable Diffusion pipeline (module-scoped fixture)


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


TWINS = [name for name, spec in SOLVERS.items() if spec.diffusers_class is not None]
SIGMA_SPACE = ("euler", "heun")  # init_noise_sigma != 1: the pipeline must scale x_T and the model input


def _exported(tmp_path, solver: str, ac: torch.Tensor, n: int = 6) -> Schedule:
    """A non-uniform schedule for `ac`, exported with its solver and model hash as `stridelab export` writes it."""
    s = karras(n, ac)
    tuned = Schedule(s.timesteps, 1000, "learned", {}, {"solver": SOLVERS[solver].record()})
    write_export(tmp_path / "schedule.json", export_dict(tuned, model="tiny", sigmas=s.sigmas(ac).tolist(),
                                                        alphas_hash=alphas_cumprod_sha256(ac)))
    return Schedule.load(tmp_path / "schedule.json")


def _record_unet_timesteps(unet) -> list[float]:
    """Wrap ``unet.forward``: the timesteps it is actually called with, in order."""
    seen, forward = [], unet.forward

    def recording(sample, timestep, *args, **kwargs):
        seen.append(float(torch.as_tensor(timestep).reshape(-1)[0]))
        return forward(sample, timestep, *args, **kwargs)

    unet.forward = recording
    return seen


def _visits(solver: str, schedule: Schedule) -> list[int]:
    ts = list(schedule.timesteps)
    return ts[:1] + [t for t in ts[1:] for _ in range(2)] if solver == "heun" else ts  # Heun: 2n - 1 evaluations


@pytest.mark.parametrize("solver", TWINS)
def test_the_diffusers_snippet_runs_the_schedule_on_a_ddpm_pipeline(tmp_path, monkeypatch, solver):
    """The README block as written, on a real DDPMPipeline (which takes no timesteps= and re-spaces
    set_timesteps(n) evenly): the UNet is called at exactly the schedule's timesteps, or, for a sigma-space
    solver that DDPMPipeline cannot scale for, the run is refused before the first model call."""
    from diffusers import DDPMPipeline, DDPMScheduler

    # A DDPM checkpoint that clips x0, as google/ddpm-* ship; saved and loaded as a user's would be.
    DDPMPipeline(unet=tiny_unet(out_scale=50.0), scheduler=DDPMScheduler(clip_sample=True)).save_pretrained(tmp_path / "p")
    pipe = DDPMPipeline.from_pretrained(tmp_path / "p")
    pipe.set_progress_bar_config(disable=True)
    own = pipe.scheduler
    sched = _exported(tmp_path, solver, AC)
    seen = _record_unet_timesteps(pipe.unet)
    monkeypatch.chdir(tmp_path)
    ns = {"pipe": pipe}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*tuned for.*")  # the recorded solver: no mismatch warning
        if solver in SIGMA_SPACE:
            with pytest.raises(StridelabError, match="scale_model_input.*k-diffusion"):
                exec(compile(BLOCKS[0], "README.md", "exec"), ns)
            assert seen == []
        else:
            exec(compile(BLOCKS[0], "README.md", "exec"), ns)
            assert seen == list(sched.timesteps) and len(ns["images"]) == 1
    assert pipe.scheduler is own  # left as it was


def test_plain_pipe_call_is_what_the_readme_warns_about(tmp_path):
    """What the README says `pipe(num_inference_steps=n)` alone does after configuring the scheduler: the
    pipeline's own set_timesteps(n) re-spaces the steps evenly."""
    from diffusers import DDPMPipeline

    from pipeline.interop import scheduler_for_schedule

    pipe = DDPMPipeline(unet=tiny_unet(), scheduler=StrideDDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    sched = _exported(tmp_path, "dpmsolver++2m", AC, n=10)
    pipe.scheduler = scheduler_for_schedule(sched, pipe.scheduler)
    seen = _record_unet_timesteps(pipe.unet)
    pipe(num_inference_steps=10, output_type="pt")
    assert len(seen) == 10 and len({a - b for a, b in zip(seen, seen[1:])}) == 1 and seen != list(sched.timesteps)


@pytest.mark.parametrize("solver", ["ddim", "euler", "heun", "dpmsolver++2m", "unipc"])
def test_sample_with_schedule_passes_it_to_a_pipeline_that_takes_it(sd_dir, tmp_path, solver):
    """A Stable Diffusion pipeline (timesteps= and sigmas=, input scaling): Euler goes in as sigmas=, Heun and
    2M as timesteps=, UniPC pinned, DDIM in the scheduler's config; the UNet sees exactly the schedule."""
    from diffusers import StableDiffusionPipeline

    from pipeline.core.noise import as_alphas_cumprod
    from pipeline.interop import sample_with_schedule

    pipe = StableDiffusionPipeline.from_pretrained(sd_dir)
    pipe.set_progress_bar_config(disable=True)
    sched = _exported(tmp_path, solver, as_alphas_cumprod(pipe.scheduler.alphas_cumprod), n=4)
    seen = _record_unet_timesteps(pipe.unet)
    out = sample_with_schedule(pipe, sched, prompt="a cat", guidance_scale=1.0, output_type="latent")
    assert [round(t) for t in seen] == _visits(solver, sched) and out.images.isfinite().all()
    assert max(abs(a - b) for a, b in zip(seen, _visits(solver, sched))) < 1e-3


def test_sample_with_schedule_refuses_step_arguments_and_other_steps(tmp_path):
    from diffusers import DDPMPipeline

    from pipeline.interop import sample_with_schedule

    pipe = DDPMPipeline(unet=tiny_unet(), scheduler=StrideDDIMScheduler())
    sched = _exported(tmp_path, "ddim", AC)
    with pytest.raises(StridelabError, match="num_inference_steps"):
        sample_with_schedule(pipe, sched, num_inference_steps=50)

    class Skipping(DDPMPipeline):  # a pipeline that runs fewer steps than it was given (img2img strength)
        def __call__(self, num_inference_steps=6, **kw):
            self.scheduler.set_timesteps(num_inference_steps)
            x = torch.randn(1, 1, 8, 8)
            for t in self.scheduler.timesteps[2:]:
                x = self.scheduler.step(self.unet(x, t).sample, t, x).prev_sample
            return x

    skipping = Skipping(unet=tiny_unet(), scheduler=StrideDDIMScheduler())
    with pytest.raises(StridelabError, match=f"called the model at timestep {float(sched.timesteps[2])}"):
        sample_with_schedule(skipping, sched)


def _sample_euler(model, x, sigmas, extra_args=None):
    """Euler in sigma (Karras et al. 2022, Alg. 1 without churn), with k-diffusion's signature."""
    for i in range(len(sigmas) - 1):
        d = (x - model(x, sigmas[i])) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def test_the_k_diffusion_snippet_runs_and_is_ddim(monkeypatch):
    from diffusers import DDPMScheduler

    from pipeline.models.denoisers import gaussian_mixture
    from pipeline.solvers.ddim import ddim_sample

    mix = gaussian_mixture("ring8", AC)
    sched = Schedule(karras(8, AC).timesteps, 1000, "learned", {}, {"solver": SOLVERS["ddim"].record()})

    def model(x, sigma):  # k-diffusion's denoiser contract: D(x, sigma) = x - sigma * eps(x / sqrt(1 + sigma^2))
        abar = torch.full((x.shape[0],), 1 / (1 + float(sigma) ** 2), dtype=torch.float64)
        return x - sigma * mix.eps_at_abar(x * abar.sqrt()[:, None], abar)

    torch.manual_seed(0)
    kd = types.ModuleType("k_diffusion")  # k-diffusion is not a dependency: its sample_euler, written its way
    kd.sampling = types.SimpleNamespace(sample_euler=_sample_euler)
    monkeypatch.setitem(sys.modules, "k_diffusion", kd)
    pipe = types.SimpleNamespace(scheduler=DDPMScheduler())  # the block reads only pipe.scheduler.alphas_cumprod
    ns = {"sched": sched, "pipe": pipe, "model": model, "shape": (16, 2)}
    exec(compile(BLOCKS[1], "README.md", "exec"), ns)
    assert torch.equal(ns["alphas_cumprod"], pipe.scheduler.alphas_cumprod)
    torch.manual_seed(0)
    x_T = torch.randn(16, 2)  # the snippet's draw; VP x_T = x / sqrt(1 + sigma_max^2)
    sig0 = ns["sigmas"][0].double()
    ref = ddim_sample(lambda x, t: mix.eps_at_abar(x, AC[t].double()), x_T.double() * sig0 / (1 + sig0**2).sqrt(),
                      sched.timesteps, AC)
    torch.testing.assert_close(ns["x0"].double(), ref, atol=1e-4, rtol=0)
