"""The gradient student's per-seed distance to the teacher, differentiable in the student's x0.

Every distance is ``d(x0_student [B, ...], x0_teacher [B, ...]) -> [B]`` on the model's own data scale
(``data_range`` = (lo, hi); images are mapped to [0, 1] by (x - lo) / (hi - lo) before comparing):

============  ======================================================================================
name          d per seed
============  ======================================================================================
``mse``       mean over dimensions of ((x - x_teacher) / (hi - lo))^2 (the recon metric's definition)
``features``  mean over the D feature dimensions of (f(x) - f(x_teacher))^2, f the bundled digits feature
              network (`pipeline.metrics.features`, the one FID uses); 1x8x8 images only
``lpips``     LPIPS (Zhang et al. 2018, arXiv 1801.03924) with AlexNet, from the ``lpips`` package; only
              where the package and its weights are present locally (nothing is downloaded)
============  ======================================================================================

The teacher's side is a constant target (no gradient flows into it).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch

from pipeline.errors import StridelabError

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

DISTANCES = ("mse", "features", "lpips")
"""The distances `make_distance` builds."""

LPIPS_SIZE = 64
"""Side images are upsampled to for LPIPS: AlexNet's first conv (11x11, stride 4) and pools need more than 8x8."""


def per_seed_mse(x: torch.Tensor, target: torch.Tensor, scale: float) -> torch.Tensor:
    """Mean over dimensions of ((x - target) * scale)^2, per row: [B] (the recon metric's definition)."""
    return ((x - target) * scale).pow(2).flatten(1).mean(1)


def make_distance(name: str, data_range: tuple[float, float] = (-1.0, 1.0),
                  sample_shape: tuple[int, ...] | None = None) -> Distance:
    """The distance `name` (see the module docstring) for data in `data_range`.

    `sample_shape` (per seed), when given, is checked now rather than at the first call (which may run in a
    Ray actor, where an error would arrive wrapped).

    Raises:
        StridelabError: an unknown name, a shape the distance cannot compare, or what ``lpips`` needs is
            missing here (one line naming it).
    """
    check_available(name)
    if sample_shape is not None:
        _check_shape(name, tuple(sample_shape))
    lo, hi = float(data_range[0]), float(data_range[1])
    scale = 1.0 / (hi - lo)
    if name == "mse":
        return lambda x, target: per_seed_mse(x, target.to(x.dtype), scale)
    if name == "features":
        return _feature_distance(lo, scale)
    return _lpips_distance(lo, scale)


def _check_shape(name: str, shape: tuple[int, ...]) -> None:
    """Raise unless distance `name` can compare samples of per-seed `shape`."""
    if name == "features" and shape != (1, 8, 8):
        raise StridelabError(f"features compares 1x8x8 images (the bundled digits feature network); this model's "
                             f"samples have shape {shape}", param="grad_loss")
    if name == "lpips" and (len(shape) != 3 or shape[0] not in (1, 3)):
        raise StridelabError(f"lpips compares images [1 or 3, H, W]; this model's samples have shape {shape}",
                             param="grad_loss")


@lru_cache(maxsize=4)
def _feature_net(dtype: torch.dtype, device: str):
    """The bundled feature net in `dtype` on `device`, loaded once per process (actors call every iteration)."""
    from pipeline.metrics.features import load_feature_net

    net = load_feature_net().to(device=device, dtype=dtype).eval()
    for p in net.parameters():
        p.requires_grad_(False)  # a fixed metric: only the student's x0 is differentiated
    return net


def _feature_distance(lo: float, scale: float) -> Distance:
    from pipeline.metrics.features import PIXEL_SCALE

    def d(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_shape("features", tuple(x.shape[1:]))
        net = _feature_net(x.dtype, str(x.device))
        f = net((x - lo) * (scale * PIXEL_SCALE))
        with torch.no_grad():
            f_t = net((target.to(x.dtype) - lo) * (scale * PIXEL_SCALE))
        return (f - f_t).pow(2).mean(1)

    return d


def _lpips_weights_missing() -> str | None:
    """What LPIPS needs and is not here (None when all is): the package, its linear-layer weights, AlexNet's."""
    try:
        import lpips
    except ImportError:
        return "the Python package lpips is not installed"
    lin = Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"
    if not lin.is_file():
        return f"the lpips linear weights {lin} are missing"
    ckpt = Path(torch.hub.get_dir()) / "checkpoints"
    if not any(ckpt.glob("alexnet-owt-*.pth")):
        return f"torchvision's AlexNet weights (alexnet-owt-*.pth) are not in {ckpt}"
    return None


@lru_cache(maxsize=4)
def _lpips_net(device: str):
    import lpips

    net = lpips.LPIPS(net="alex", verbose=False).to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def check_available(name: str) -> None:
    """Raise (one line) when distance `name` is unknown or cannot run on this machine (lpips without its
    package or weights); needs no model, so a sweep's config can check it before any work."""
    if name not in DISTANCES:
        raise StridelabError(f"must be one of {', '.join(DISTANCES)}, got {name!r}", param="grad_loss")
    missing = _lpips_weights_missing() if name == "lpips" else None
    if missing is not None:
        raise StridelabError(f"lpips needs the lpips package and its AlexNet weights on this machine (nothing is "
                             f"downloaded), but {missing}; use features or mse", param="grad_loss")


def _lpips_distance(lo: float, scale: float) -> Distance:
    def to_lpips(x: torch.Tensor) -> torch.Tensor:
        # LPIPS takes 3-channel images in [-1, 1]; upsample the small images so AlexNet's layers have room
        x = ((x - lo) * scale * 2 - 1).float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if min(x.shape[2:]) < LPIPS_SIZE:
            x = torch.nn.functional.interpolate(x, size=(LPIPS_SIZE, LPIPS_SIZE), mode="bilinear", align_corners=False)
        return x

    def d(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_shape("lpips", tuple(x.shape[1:]))
        net = _lpips_net(str(x.device))
        return net(to_lpips(x), to_lpips(target.detach())).flatten(1).sum(1).to(x.dtype)

    return d
