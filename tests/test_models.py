"""`pipeline.models.load.load_model`: every spec form, on real (tiny, random, saved-to-disk) diffusers models.

Nothing is mocked: the Hub test sets HF_HUB_OFFLINE=1 so it fails fast here and the message can be
checked, and one bundled test points `models.ASSETS_DIR` at a tmp copy to exercise the path logic. Fixtures are module-scoped: each tiny model is built and saved once.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny import tiny_unet

import pipeline
from pipeline.models import load as models
from pipeline.solvers.ddim import ddim_sample
from pipeline.errors import StridelabError
from pipeline.models.load import LoadedModel, load_model, scheduler_from_config

REPO = Path(__file__).resolve().parents[1]
HUB_ID = "google/ddpm-cifar10-32"


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ddpm_dir(tmp_path_factory) -> Path:
    """A DDPMPipeline directory (model_index.json, unet/, scheduler/) with diffusers' default scheduler."""
    from diffusers import DDPMPipeline, DDPMScheduler

    d = tmp_path_factory.mktemp("ddpm") / "pipe"
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(d, safe_serialization=True)
    return d


def copy_with_scheduler(src: Path, dst: Path, **changes) -> Path:
    """Copy a pipeline directory, editing its scheduler config."""
    shutil.copytree(src, dst)
    p = dst / "scheduler" / "scheduler_config.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), **changes}))
    return dst


def write_clip_tokenizer(d: Path) -> None:
    """A minimal byte-level BPE vocabulary (256 byte symbols, each also word-final) + 2 merges for 'cat'."""
    bs = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = [chr(b) for b in bs] + [chr(256 + i) for i in range(256 - len(bs))]  # GPT-2 bytes_to_unicode
    tokens = chars + [c + "</w>" for c in chars] + ["ca", "cat</w>", "<|startoftext|>", "<|endoftext|>"]
    d.mkdir(parents=True)
    (d / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
    (d / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n")
    (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 16, "tokenizer_class": "CLIPTokenizer"}))


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    """A tiny random Stable-Diffusion-style pipeline: 4x8x8 latents, 16x16 RGB images, 32-wide CLIP."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("sd")
    write_clip_tokenizer(root / "tok")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1,
    ))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, clip_sample=False)
    StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(root / "tok"),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(root / "sd", safe_serialization=True)
    return root / "sd"


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg, msg
    return msg


# ---------------------------------------------------------------------------------------------- pixel models


def test_gmm_scheme_unchanged():
    m = load_model("gmm:ring8")
    assert isinstance(m, LoadedModel) and m.sample_shape == (2,) and m.decode is None
    assert m.denoiser(torch.zeros(3, 2), torch.full((3,), 500)).shape == (3, 2)


def test_pipeline_dir_loads_eps_model_and_samples(ddpm_dir):
    from diffusers import DDPMScheduler, UNet2DModel

    m = load_model(str(ddpm_dir))
    assert m.spec == str(ddpm_dir) and m.sample_shape == (1, 8, 8) and m.data_range == (-1.0, 1.0) and m.decode is None
    assert m.denoiser.prediction_type == "epsilon"
    assert torch.equal(m.alphas_cumprod, DDPMScheduler().alphas_cumprod.double())  # bit-equal to diffusers
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([999, 10])
    ref = UNet2DModel.from_pretrained(ddpm_dir / "unet")(x, t).sample
    torch.testing.assert_close(m.denoiser(x, t), ref)  # the saved weights, not a fresh init
    x0 = ddim_sample(m.denoiser, x, [999, 500], m.alphas_cumprod)
    assert x0.shape == (2, 1, 8, 8) and torch.isfinite(x0).all()


@pytest.mark.parametrize("layout", ["unet_subfolder", "bare_unet+scheduler_dir", "bare_unet+scheduler_config.json"])
def test_other_directory_layouts(ddpm_dir, tmp_path, layout):
    ref = load_model(str(ddpm_dir))
    sched = (ddpm_dir / "scheduler" / "scheduler_config.json").read_text().replace('"linear"', '"scaled_linear"')
    d = tmp_path / "m"
    if layout == "unet_subfolder":
        shutil.copytree(ddpm_dir / "unet", d / "unet")
        (d / "scheduler").mkdir()
        (d / "scheduler" / "scheduler_config.json").write_text(sched)
    else:
        shutil.copytree(ddpm_dir / "unet", d)
        if layout == "bare_unet+scheduler_dir":
            (d / "scheduler").mkdir()
            (d / "scheduler" / "scheduler_config.json").write_text(sched)
        else:
            (d / "scheduler_config.json").write_text(sched)
    m = load_model(str(d))
    # The abar table is the one this folder's scheduler config says, not a default.
    torch.testing.assert_close(m.alphas_cumprod, models.make_alphas_cumprod("scaled_linear"), rtol=0, atol=0)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 700])
    torch.testing.assert_close(m.denoiser(x, t), ref.denoiser(x, t))


@pytest.mark.parametrize(
    "cfg",
    [
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 500},
        {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000},
        {"trained_betas": torch.linspace(1e-3, 0.05, 200).tolist(), "num_train_timesteps": 200},
    ],
    ids=["scaled_linear_T500", "cosine", "trained_betas"],
)
def test_alphas_cumprod_match_diffusers(cfg):
    from diffusers import DDPMScheduler

    abar, pred = scheduler_from_config({**cfg, "prediction_type": "v_prediction"})
    assert pred == "v_prediction"
    assert torch.equal(abar, DDPMScheduler(**cfg).alphas_cumprod.double())


def test_unsupported_beta_schedule_is_one_line(ddpm_dir, tmp_path):
    d = copy_with_scheduler(ddpm_dir, tmp_path / "m", beta_schedule="sigmoid")
    with pytest.raises(StridelabError) as e:
        load_model(str(d))
    assert "unsupported beta_schedule 'sigmoid'" in one_line_error(e) and "scheduler_config.json" in str(e.value)


class PredictFromEps(torch.nn.Module):
    """An eps UNet turned into a v- or x0-predicting one with the known abar (the adapter must undo it)."""

    def __init__(self, unet: torch.nn.Module, alphas_cumprod: torch.Tensor, kind: str):
        super().__init__()
        self.unet, self.kind = unet, kind
        self.register_buffer("abar", alphas_cumprod.clone())

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = self.unet(x, t).sample
        a = self.abar[t].reshape(-1, 1, 1, 1).to(x.dtype)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0 if self.kind == "v_prediction" else x0


@pytest.mark.parametrize("kind", ["v_prediction", "sample"])
def test_v_and_sample_prediction_give_the_eps_models_eps(ddpm_dir, tmp_path, kind):
    """Same weights, scheduler says `kind`: the loader's denoiser must read it and convert back to eps."""
    eps_model = load_model(str(ddpm_dir))
    m = load_model(str(copy_with_scheduler(ddpm_dir, tmp_path / kind, prediction_type=kind)))
    assert m.denoiser.prediction_type == kind
    x, t = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([50, 300, 700, 999])
    eps = eps_model.denoiser(x, t)
    assert (m.denoiser(x, t) - eps).abs().max() > 1e-2  # the raw eps net read as `kind` is something else
    # A network that really predicts `kind` (built from the same eps net): the loaded denoiser recovers eps.
    m.denoiser.model = PredictFromEps(m.denoiser.model, m.alphas_cumprod.float(), kind)
    torch.testing.assert_close(m.denoiser(x, t), eps, atol=1e-5, rtol=0)


def test_bf16_model_returns_eps_in_callers_dtype(ddpm_dir):
    m = load_model(str(ddpm_dir), device="cpu", dtype=torch.bfloat16)
    assert next(m.denoiser.model.parameters()).dtype == torch.bfloat16
    x = torch.randn(2, 1, 8, 8)
    eps = m.denoiser(x, torch.tensor([500, 500]))
    assert eps.dtype == torch.float32 and torch.isfinite(eps).all()
    torch.testing.assert_close(eps, load_model(str(ddpm_dir)).denoiser(x, torch.tensor([500, 500])), atol=0.1, rtol=0.05)


# ---------------------------------------------------------------------------------------------- bad checkpoints


def test_pickle_only_weights_are_refused(tmp_path):
    d = tmp_path / "unet"
    tiny_unet().save_pretrained(d, safe_serialization=False)
    (d / "scheduler_config.json").write_text("{}")
    assert list(d.glob("*.bin")) and not list(d.glob("*.safetensors"))
    with pytest.raises(StridelabError) as e:
        load_model(str(d))
    assert "only safetensors weights are loaded (no pickle)" in one_line_error(e)


def test_corrupt_safetensors_names_the_file(ddpm_dir, tmp_path):
    d = copy_with_scheduler(ddpm_dir, tmp_path / "m")
    f = d / "unet" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:5000])  # truncated download
    with pytest.raises(StridelabError) as e:
        load_model(str(d))
    assert str(f) in one_line_error(e) and "corrupt" in str(e.value)


def test_channel_mismatch_and_missing_sample_size(tmp_path):
    d = tmp_path / "learned_var"
    tiny_unet(in_channels=1, out_channels=2).save_pretrained(d / "unet")
    (d / "scheduler_config.json").write_text("{}")
    with pytest.raises(StridelabError) as e:
        load_model(str(d))
    assert "in_channels=1 != out_channels=2" in one_line_error(e)

    d = tmp_path / "no_size"
    tiny_unet().save_pretrained(d)
    (d / "scheduler_config.json").write_text("{}")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "sample_size": None}))
    with pytest.raises(StridelabError) as e:
        load_model(str(d))
    assert "sample_size must be set" in one_line_error(e)


def test_bare_unet_without_scheduler_config(tmp_path):
    tiny_unet().save_pretrained(tmp_path / "u")
    with pytest.raises(StridelabError) as e:
        load_model(str(tmp_path / "u"))
    assert "no scheduler config" in one_line_error(e)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("unknown:x", "unknown model spec scheme 'unknown:'"),
        ("/nonexistent/model", "model directory '/nonexistent/model' does not exist"),
        ("./not/here", "does not exist"),
        ("gmm:nope", "unknown mixture 'nope'"),
        ("bundled:nope", "unknown bundled model 'nope'"),
        ("", "empty model spec"),
        ("gmm:ring8?prompt=a", "only apply to latent"),
        ("gmm:ring8?colour=red", "bad options"),
    ],
)
def test_bad_specs_are_one_line_errors(spec, expected):
    with pytest.raises(StridelabError) as e:
        load_model(spec)
    msg = one_line_error(e)
    assert expected in msg
    if spec.startswith(("unknown", "/", "./")):
        assert "gmm:<name>" in msg and "bundled:<name>" in msg and "org/name" in msg  # lists the accepted forms


def test_pipeline_dir_rejects_latent_options(ddpm_dir):
    with pytest.raises(StridelabError, match="only apply to latent"):
        load_model(f"{ddpm_dir}?prompt=a%20cat")


# ---------------------------------------------------------------------------------------------- bundled


def test_bundled_path_is_inside_the_package(ddpm_dir, tmp_path, monkeypatch):
    assert models.ASSETS_DIR / models.BUNDLED["digits"] == Path(pipeline.__file__).resolve().parent / "assets/digits/ddpm"
    monkeypatch.setattr(models, "ASSETS_DIR", tmp_path)
    with pytest.raises(StridelabError) as e:
        load_model("bundled:digits")
    assert "missing" in one_line_error(e) and "stridelab train digits" in str(e.value)
    shutil.copytree(ddpm_dir, tmp_path / "digits" / "ddpm")
    m = load_model("bundled:digits")
    assert m.spec == "bundled:digits" and m.sample_shape == (1, 8, 8) and m.data_range == (-1.0, 1.0)


def test_real_bundled_digits_model():
    """The REAL bundled digits DDPM (it ships in pipeline/assets/digits/ddpm): missing is a failure."""
    assert (models.ASSETS_DIR / "digits" / "ddpm" / "model_index.json").is_file(), "bundled digits DDPM missing"
    m = load_model("bundled:digits")
    assert m.sample_shape == (1, 8, 8) and m.data_range == (-1.0, 1.0) and m.decode is None
    assert torch.equal(m.alphas_cumprod, models.make_alphas_cumprod("linear", 1000))
    x_T = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x0 = ddim_sample(m.denoiser, x_T, list(range(950, -1, -50)), m.alphas_cumprod)  # 20 uniform steps
    # A trained model lands (mostly) in the data range: measured 97.6% of pixels within [-1.2, 1.2]
    # (x_T itself: 77%). A few pixels of a 20-step sample overshoot, so this checks the bulk, not the max.
    assert torch.isfinite(x0).all()
    assert (x0.abs() <= 1.2).float().mean() > 0.9


# ---------------------------------------------------------------------------------------------- the Hub


@pytest.mark.parametrize("spec", [HUB_ID, f"hf:{HUB_ID}"])
def test_hub_id_offline_is_one_clear_line(spec, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network wait; the download call itself is real
    monkeypatch.chdir(tmp_path)  # so a local "google/..." folder cannot shadow the hub id
    assert models._hub_offline()  # read at call time, though huggingface_hub read it at import
    with pytest.raises(StridelabError) as e:
        load_model(spec)
    assert one_line_error(e) == (
        f"cannot download '{HUB_ID}': no network access (offline). Pre-download it on a machine with network: "
        f"`huggingface-cli download {HUB_ID} --local-dir DIR`, then pass DIR as the `model` spec"
    )


# ---------------------------------------------------------------------------------------------- latent models


def test_latent_model_samples_and_decodes(sd_dir):
    m = load_model(f"{sd_dir}?prompt=a%20cat&guidance=7.5")
    assert m.sample_shape == (4, 8, 8) and m.decode is not None and m.data_range == (-1.0, 1.0)
    assert m.spec == f"{sd_dir}?prompt=a+cat&guidance=7.5" and m.denoiser.guidance_scale == 7.5
    torch.testing.assert_close(m.alphas_cumprod, models.make_alphas_cumprod("scaled_linear", 1000, 0.00085, 0.012), rtol=0, atol=0)
    z_T = torch.randn(2, *m.sample_shape, generator=torch.Generator().manual_seed(0))
    z0 = ddim_sample(m.denoiser, z_T, [999, 499], m.alphas_cumprod)
    images = m.decode(z0)
    assert z0.shape == (2, 4, 8, 8) and images.shape == (2, 3, 16, 16)
    assert torch.isfinite(images).all() and images.min() >= -1 and images.max() <= 1 and images.std() > 0


def test_classifier_free_guidance_matches_the_formula(sd_dir):
    """g = 1 is the conditional eps alone, g = 0 the unconditional one, g = 3 the CFG combination."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from pipeline.models.latent import encode_prompt

    unet = UNet2DConditionModel.from_pretrained(sd_dir / "unet").eval()
    text_encoder = CLIPTextModel.from_pretrained(sd_dir / "text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(sd_dir / "tokenizer")
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([900, 100])
    with torch.no_grad():
        eps_c = unet(x, t, encoder_hidden_states=encode_prompt(tokenizer, text_encoder, "a cat").expand(2, -1, -1)).sample
        eps_u = unet(x, t, encoder_hidden_states=encode_prompt(tokenizer, text_encoder, "").expand(2, -1, -1)).sample
    assert (eps_c - eps_u).abs().max() > 1e-3  # the prompt matters, so the checks below can fail
    m = load_model(f"{sd_dir}?prompt=ignored&guidance=9", prompt="a cat", guidance_scale=1.0)  # keywords win
    assert m.spec == f"{sd_dir}?prompt=a+cat&guidance=1.0"
    for g, expected in [(1.0, eps_c), (0.0, eps_u), (3.0, eps_u + 3 * (eps_c - eps_u))]:
        m.denoiser.model.guidance_scale = g  # same loaded denoiser (prompt states encoded once), new scale
        torch.testing.assert_close(m.denoiser(x, t), expected, atol=1e-5, rtol=1e-5)


def test_latent_bad_guidance_option(sd_dir):
    with pytest.raises(StridelabError, match="guidance must be a number"):
        load_model(f"{sd_dir}?guidance=lots")


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_bad_model_is_one_stderr_line():
    """Each bad --model exits 2 with exactly one stderr line and no traceback (subprocesses run in parallel)."""
    specs = ["/nonexistent", "gmm:nope", "unknown:x"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "jobs.cli", "schedules", "--model", s], cwd=REPO,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for s in specs
    ]
    for spec, p in zip(specs, procs):
        _, err = p.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert p.returncode == 2, (spec, err)
        assert len(lines) == 1 and "Traceback" not in err, (spec, err)
        assert lines[0].startswith("stridelab schedules: error:"), (spec, err)


def test_latent_pipeline_missing_component_folder(sd_dir, tmp_path):
    d = tmp_path / "sd"
    shutil.copytree(sd_dir, d)
    shutil.rmtree(d / "text_encoder")
    with pytest.raises(StridelabError) as e:
        load_model(str(d))
    assert "missing model folder" in one_line_error(e) and "text_encoder" in str(e.value)
