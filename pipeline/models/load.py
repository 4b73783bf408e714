"""One loader for every model a sweep can run on, from a spec string.

Spec grammar (checked in this order)::

    gmm:<name>                       analytic Gaussian mixture: ring8, gauss, blobs64
    bundled:<name>                   a model shipped in pipeline/assets: digits (8x8 DDPM, [-1, 1]),
                                     digits-v (the same with cosine betas and v prediction)
    <dir>[?<options>]                an existing local diffusers directory (below)
    [hf:]<org>/<name>[?<options>]    a Hugging Face Hub id: fetched by diffusers (safetensors only,
                                     HF_HUB_OFFLINE respected), then loaded as <dir>

A local directory is one of
    - a pixel-space pipeline (``DDPMPipeline``, ``DDIMPipeline``, ...): model_index.json naming
      ``unet`` (UNet2DModel) and ``scheduler``;
    - a folder with a ``unet/`` subfolder, or a bare UNet2DModel folder (config.json + safetensors), with
      the scheduler config at ``scheduler/scheduler_config.json`` or ``scheduler_config.json``;
    - a latent, Stable-Diffusion-style pipeline: model_index.json naming ``unet`` (UNet2DConditionModel),
      ``vae`` (AutoencoderKL), ``text_encoder`` (CLIPTextModel), ``tokenizer`` and ``scheduler``.

Options (latent models only) are a URL query, e.g. ``sd-dir?prompt=a%20cat&guidance=7.5``:
``prompt`` (default ""), ``negative_prompt`` (default "", the unconditional branch) and ``guidance``
(classifier-free guidance scale, default 7.5). The keyword arguments of `load_model` override them; a
latent model's `LoadedModel.spec` spells out all three so exports name the exact prompt.

``alphas_cumprod`` always comes from the checkpoint's scheduler config and ``prediction_type`` is
adapted to eps by `pipeline.models.denoisers.DiffusersDenoiser`. Only safetensors weights are read (never pickle).
diffusers and transformers are imported only when a checkpoint is loaded, so `gmm:` stays fast.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

import torch

from pipeline.models.denoisers import PREDICTION_TYPES, DiffusersDenoiser, GMM_NAMES, gaussian_mixture
from pipeline.errors import StridelabError, first_line
from pipeline.models.bundled import ASSETS_DIR
from pipeline.models.hub import _download, _hub_offline  # noqa: F401  (_hub_offline: tests read it here)
from pipeline.core.noise import BETA_SCHEDULES, as_alphas_cumprod, make_alphas_cumprod

BUNDLED: dict[str, str] = {"digits": "digits/ddpm", "digits-v": "digits-v/ddpm"}
"""bundled:<name> -> directory under `ASSETS_DIR` (a DDPMPipeline saved with safetensors)."""

LATENT_OPTIONS = ("prompt", "negative_prompt", "guidance")
DEFAULT_GUIDANCE = 7.5
ACCEPTED = (
    f"gmm:<name> ({', '.join(GMM_NAMES)}), bundled:<name> ({', '.join(BUNDLED)}), a local diffusers directory "
    "(DDPM/DDIM pipeline, UNet2DModel or Stable-Diffusion-style; latent options ?prompt=...&guidance=...), "
    "or a Hugging Face Hub id [hf:]org/name"
)
# Hugging Face repo ids: "org/name" of letters, digits, '-', '_', '.', not starting with '.' or '-'.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}

DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
"""The network dtypes a model may run in. The sampler's state and coefficients never follow it: x and eps
stay float32 and the coefficients float64 (`DiffusersDenoiser` casts at the network's edge)."""


def model_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The one check of a network dtype: a name in `DTYPES` (or that torch dtype) -> the torch dtype."""
    if isinstance(dtype, torch.dtype) and str(dtype).removeprefix("torch.") in DTYPES:
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return getattr(torch, dtype)
    raise StridelabError(f"must be one of {', '.join(DTYPES)}, got {dtype!r}", param="dtype")


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to sample.

    Attributes:
        spec: the spec string it was loaded from (used as the model id in exports).
        denoiser: ``(x [B, *sample_shape], t LongTensor[B]) -> eps``.
        alphas_cumprod: float64 [T] abar table from the checkpoint.
        sample_shape: per-sample shape of x, e.g. (1, 8, 8); for latent models the latent shape (C, H/8, W/8).
        data_range: the (low, high) of clean data (of ``decode(x)`` for latent models), to map samples to
            [0, 1] for metrics and images.
        decode: latent models only: ``latents [B, *sample_shape] -> images [B, 3, H, W]`` in `data_range`;
            None for pixel-space models (x is the image).
    """

    spec: str
    denoiser: torch.nn.Module
    alphas_cumprod: torch.Tensor
    sample_shape: tuple[int, ...]
    data_range: tuple[float, float] = (-1.0, 1.0)
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.numel())

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Map clean samples from `data_range` to [0, 1] (not clipped)."""
        lo, hi = self.data_range
        return (x - lo) / (hi - lo)


def load_model(
    spec: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    *,
    prompt: str | None = None,
    negative_prompt: str | None = None,
    guidance_scale: float | None = None,
) -> LoadedModel:
    """Load a model from a spec string (grammar in the module docstring).

    Args:
        spec: e.g. ``gmm:ring8``, ``bundled:digits``, ``path/to/ddpm``, ``sd-dir?prompt=a%20cat``, ``google/ddpm-cifar10-32``.
        device: where the network runs (the caller picks; nothing is hard-coded).
        dtype: the network's weight dtype, one of `DTYPES` (bf16/fp16 pay on a GPU). Samples and eps stay in the caller's dtype.
        prompt, negative_prompt, guidance_scale: latent models only; override the spec's query options.
    Raises:
        StridelabError: one line saying what is wrong and which forms are accepted.
    """
    dtype = model_dtype(dtype)
    base, options = _split_options(spec)
    overrides = {"prompt": prompt, "negative_prompt": negative_prompt, "guidance": guidance_scale}
    options.update({k: v for k, v in overrides.items() if v is not None})
    scheme, _, rest = base.partition(":")
    if scheme == "gmm":
        _no_options(spec, options)
        d = gaussian_mixture(rest).to(device)
        return LoadedModel(spec, d, d.alphas_cumprod.cpu(), d.sample_shape, data_range=(-1.0, 1.0))
    if scheme == "bundled":
        _no_options(spec, options)
        loaded = _load_dir(bundled_dir(rest), spec, device, dtype, {})
        from pipeline.models.digits import data_for_seeds

        loaded.denoiser.sample_data = data_for_seeds  # real data for the inversion round trip (digits.data_index)
        loaded.denoiser.sample_data_is_a_dataset = True  # not draws of the model: FID keeps the digits reference
        return loaded
    if Path(base).expanduser().is_dir():
        return _load_dir(Path(base).expanduser(), spec, device, dtype, options)
    repo_id = base[3:] if scheme == "hf" else base
    if _HUB_ID.match(repo_id) and ".." not in repo_id:
        return _load_dir(_download(repo_id), spec, device, dtype, options)
    if Path(base).expanduser().exists():
        raise StridelabError(f"model path {base!r} is not a directory; use one of: {ACCEPTED}")
    if scheme != base and len(scheme) > 1:  # "x:..." with an unknown x (len 1 would be a Windows drive)
        raise StridelabError(f"unknown model spec scheme {scheme + ':'!r} in {spec!r}; use one of: {ACCEPTED}")
    raise StridelabError(f"model directory {base!r} does not exist; use one of: {ACCEPTED}")


def bundled_dir(name: str, assets_dir: Path | None = None) -> Path:
    """Directory of ``bundled:<name>`` under `ASSETS_DIR`; a clear error if unknown or not built yet."""
    if name not in BUNDLED:
        raise StridelabError(f"unknown bundled model {name!r}; choose one of {', '.join(BUNDLED)}")
    d = (assets_dir or ASSETS_DIR) / BUNDLED[name]
    if not (d / "model_index.json").is_file():
        raise StridelabError(
            f"bundled model {name!r} is missing at {d}: train it with `stridelab train {name}`"
        )
    return d


# ---------------------------------------------------------------------------------------------- spec options


def _split_options(spec: str) -> tuple[str, dict[str, Any]]:
    """'dir?prompt=a%20cat&guidance=7.5' -> ('dir', {'prompt': 'a cat', 'guidance': 7.5})."""
    if not isinstance(spec, str) or not spec.strip():
        raise StridelabError(f"empty model spec; use one of: {ACCEPTED}")
    if "?" not in spec or Path(spec).exists():  # a real path containing '?' wins
        return spec, {}
    base, _, query = spec.partition("?")
    parsed = parse_qs(query, keep_blank_values=True)
    unknown = sorted(set(parsed) - set(LATENT_OPTIONS))
    if unknown or not parsed:
        raise StridelabError(
            f"bad options {query!r} in model spec {spec!r}; allowed: {', '.join(LATENT_OPTIONS)} (e.g. ?prompt=a%20cat&guidance=7.5)"
        )
    options: dict[str, Any] = {k: v[-1] for k, v in parsed.items()}
    if "guidance" in options:
        try:
            options["guidance"] = float(options["guidance"])
        except ValueError:
            raise StridelabError(f"guidance must be a number, got {options['guidance']!r} in {spec!r}") from None
    return base, options


def _no_options(spec: str, options: dict[str, Any]) -> None:
    if options:
        raise StridelabError(f"{', '.join(sorted(options))} only apply to latent (text-conditioned) models, not {spec!r}")


# ---------------------------------------------------------------------------------------------- directories


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StridelabError(f"cannot read {path}: {first_line(e)}") from None
    if not isinstance(data, dict):
        raise StridelabError(f"{path} is not a JSON object")
    return data


def _find_scheduler_config(*dirs: Path) -> Path:
    candidates = [p for d in dirs for p in (d / "scheduler" / "scheduler_config.json", d / "scheduler_config.json")]
    for p in candidates:
        if p.is_file():
            return p
    raise StridelabError(
        f"no scheduler config next to the UNet in {dirs[0]}: alphas_cumprod must come from the checkpoint "
        "(expected scheduler/scheduler_config.json or scheduler_config.json)"
    )


def _load_dir(d: Path, spec: str, device, dtype: torch.dtype, options: dict[str, Any]) -> LoadedModel:
    """Detect the layout of a diffusers directory (see the module docstring) and load it."""
    index = _read_json(d / "model_index.json") if (d / "model_index.json").is_file() else None
    if index is not None:
        if "unet" not in index or "scheduler" not in index:
            raise StridelabError(f"{d / 'model_index.json'} names no unet + scheduler: not a UNet diffusion pipeline")
        if "text_encoder" in index or "vae" in index:
            return _load_latent(d, index, spec, device, dtype, options)
        unet_dir, sched = d / "unet", d / "scheduler" / "scheduler_config.json"
    elif (d / "unet" / "config.json").is_file():
        unet_dir, sched = d / "unet", _find_scheduler_config(d)
    elif (d / "config.json").is_file():
        unet_dir, sched = d, _find_scheduler_config(d, d.parent)
    else:
        raise StridelabError(
            f"{d} is not a diffusers model directory (no model_index.json, unet/ or config.json); use one of: {ACCEPTED}"
        )
    _no_options(spec, options)
    from diffusers import UNet2DModel

    cfg = _unet_config(unet_dir, "UNet2DModel")
    abar, prediction_type = scheduler_from_config(_read_json(sched), sched)
    unet = _from_pretrained(UNet2DModel, unet_dir, device, dtype)
    return LoadedModel(
        spec, DiffusersDenoiser(unet, abar, prediction_type).to(device), abar, _sample_shape(cfg, unet_dir)
    )


def _unet_config(unet_dir: Path, expected_class: str) -> dict[str, Any]:
    """Read and check a UNet's config.json: class, in/out channels, sample size."""
    cfg = _read_json(unet_dir / "config.json")
    cls = cfg.get("_class_name", expected_class)
    if cls != expected_class:
        raise StridelabError(f"{unet_dir}: the UNet is a {cls}, expected {expected_class} here")
    c_in, c_out = cfg.get("in_channels", 3), cfg.get("out_channels", 3)
    if c_in != c_out:
        # e.g. learned-variance UNets (out = 2 * in) or inpainting UNets (extra mask channels).
        raise StridelabError(
            f"{unet_dir}: UNet in_channels={c_in} != out_channels={c_out}; only eps/v/x0 models with out = in are supported"
        )
    return cfg


def _sample_shape(cfg: dict[str, Any], unet_dir: Path) -> tuple[int, ...]:
    size = cfg.get("sample_size")
    if isinstance(size, int) and size > 0:
        h = w = size
    elif isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size):
        h, w = size
    else:
        raise StridelabError(f"{unet_dir / 'config.json'}: sample_size must be set (an int or [H, W]), got {size!r}")
    return (int(cfg.get("in_channels", 3)), int(h), int(w))


def scheduler_from_config(cfg: dict[str, Any], source: Path | str = "scheduler config") -> tuple[torch.Tensor, str]:
    """abar table and prediction type from a diffusers scheduler config dict.

    ``trained_betas`` wins when present; otherwise (beta_schedule, num_train_timesteps, beta_start,
    beta_end) with diffusers' defaults (linear, 1000, 1e-4, 0.02) go to `make_alphas_cumprod`.

    Returns:
        (alphas_cumprod float64 [T], prediction_type).
    """
    if cfg.get("rescale_betas_zero_snr"):
        raise StridelabError(f"{source}: rescale_betas_zero_snr (abar_T = 0) is not supported")
    if cfg.get("trained_betas") is not None:
        betas = torch.as_tensor(cfg["trained_betas"], dtype=torch.float32)
        abar = torch.cumprod(1.0 - betas, dim=0).double()  # float32 product, as diffusers
    else:
        schedule = cfg.get("beta_schedule", "linear")
        if schedule not in BETA_SCHEDULES:
            raise StridelabError(f"{source}: unsupported beta_schedule {schedule!r}; supported: {', '.join(BETA_SCHEDULES)}")
        abar = make_alphas_cumprod(
            schedule, int(cfg.get("num_train_timesteps", 1000)), float(cfg.get("beta_start", 0.0001)), float(cfg.get("beta_end", 0.02))
        )
    try:
        abar = as_alphas_cumprod(abar)
    except StridelabError as e:
        raise StridelabError(f"{source}: {e}") from None
    prediction_type = cfg.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise StridelabError(f"{source}: unsupported prediction_type {prediction_type!r}; supported: {', '.join(PREDICTION_TYPES)}")
    return abar, prediction_type


def _check_safetensors(d: Path) -> None:
    """Refuse pickle-only folders and name a corrupt safetensors file before diffusers sees it."""
    from safetensors import SafetensorError, safe_open

    if not d.is_dir():
        raise StridelabError(f"missing model folder {d}")
    files = sorted(d.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in d.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise StridelabError(
                f"{d}: only safetensors weights are loaded (no pickle), found {', '.join(pickles)}; "
                "convert with `safetensors.torch.save_file` or re-save with save_pretrained(safe_serialization=True)"
            )
        raise StridelabError(f"{d}: no *.safetensors weights found")
    for f in files:
        try:
            with safe_open(str(f), "pt") as h:
                h.keys()
        except (SafetensorError, OSError) as e:
            raise StridelabError(f"corrupt safetensors file {f}: {first_line(e)}") from None


def _from_pretrained(cls, d: Path, device, dtype: torch.dtype):
    """``cls.from_pretrained(d)`` with safetensors only, in `dtype` on `device`, frozen, eval mode."""
    _check_safetensors(d)
    from_diffusers = cls.__module__.startswith("diffusers")
    # diffusers: torch_dtype at load (it keeps modules that must stay float32 in float32), and
    # low_cpu_mem_usage off explicitly without accelerate, else it warns on stderr. transformers renamed
    # torch_dtype to dtype in 4.56, so its models are cast after loading instead.
    kwargs = {"torch_dtype": dtype, "low_cpu_mem_usage": importlib.util.find_spec("accelerate") is not None} if from_diffusers else {}
    try:
        model = cls.from_pretrained(str(d), use_safetensors=True, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise StridelabError(f"cannot load {cls.__name__} from {d}: {first_line(e)}") from None
    model = model.to(device) if from_diffusers else model.to(device=device, dtype=dtype)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------- latent models


def _load_latent(d: Path, index: dict[str, Any], spec: str, device, dtype: torch.dtype, options: dict[str, Any]) -> LoadedModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from pipeline.models.latent import CFGDenoiser, VAEDecoder, encode_prompt

    missing = [k for k in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not index.get(k) or index[k][0] is None]
    if missing:
        raise StridelabError(f"{d}: latent pipeline lacks {', '.join(missing)} in model_index.json")
    extra = [k for k in ("text_encoder_2", "transformer", "prior") if index.get(k) and index[k][0] is not None]
    if extra:
        raise StridelabError(f"{d}: {', '.join(extra)} in model_index.json: only SD 1.x/2.x-style pipelines are supported")
    cfg = _unet_config(d / "unet", "UNet2DConditionModel")
    if cfg.get("addition_embed_type") or cfg.get("class_embed_type"):
        raise StridelabError(f"{d / 'unet'}: UNets with extra conditioning (SDXL-style added embeddings) are not supported")
    vae_cfg = _read_json(d / "vae" / "config.json")
    if vae_cfg.get("latent_channels", 4) != cfg.get("in_channels", 4):
        raise StridelabError(
            f"{d}: vae latent_channels={vae_cfg.get('latent_channels', 4)} != unet in_channels={cfg.get('in_channels', 4)}"
        )
    sched = d / "scheduler" / "scheduler_config.json"
    abar, prediction_type = scheduler_from_config(_read_json(sched), sched)

    unet = _from_pretrained(UNet2DConditionModel, d / "unet", device, dtype)
    vae = _from_pretrained(AutoencoderKL, d / "vae", device, dtype)
    text_encoder = _from_pretrained(CLIPTextModel, d / "text_encoder", device, dtype)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(d / "tokenizer"))
    except (OSError, ValueError, TypeError) as e:
        raise StridelabError(f"cannot load the tokenizer from {d / 'tokenizer'}: {first_line(e)}") from None

    prompt, negative = str(options.get("prompt", "")), str(options.get("negative_prompt", ""))
    g = float(options.get("guidance", DEFAULT_GUIDANCE))
    if not math.isfinite(g):
        raise StridelabError(f"guidance must be finite, got {g}")
    cond, uncond = encode_prompt(tokenizer, text_encoder, prompt), encode_prompt(tokenizer, text_encoder, negative)
    del text_encoder  # only the prompt states are kept
    denoiser = CFGDenoiser(unet, abar, prediction_type, cond, uncond, g).to(device)
    query = {"prompt": prompt, **({"negative_prompt": negative} if negative else {}), "guidance": g}
    return LoadedModel(
        f"{_split_options(spec)[0]}?{urlencode(query)}",
        denoiser,
        abar,
        _sample_shape(cfg, d / "unet"),
        data_range=(-1.0, 1.0),
        decode=VAEDecoder(vae),
    )
