"""A small CNN feature network for FID / KID on 8x8 digits, used through clean-fid's custom-extractor path.

Inception-v3 features are meaningless at 8x8 (and its weights download at run time, which is not
possible here), so FID/KID for the bundled digits model use the penultimate layer of a small
classifier trained on the digits train split (``stridelab train features``). Its weights ship as
safetensors in ``pipeline/assets/digits/features/`` with a JSON config; loading never unpickles.

Contract (what clean-fid hands a ``custom_feat_extractor``): ``net(images)`` takes NCHW float images in
[0, 255] (1 channel; 3 channels are averaged) and returns features [B, D]; normalisation is internal.

Distances are clean-fid's own: ``cleanfid.fid.frechet_distance`` on (mu, sigma) and
``cleanfid.fid.kernel_distance`` (KID, cubic polynomial kernel, subset estimate).

Example:
    >>> from pipeline.models.digits import load_digits_images, to_unit
    >>> f_train = extract_features(to_unit(load_digits_images("train")))
    >>> f_test = extract_features(to_unit(load_digits_images("test")))
    >>> fid_from_features(f_train, f_test) < 5.0
    True
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.errors import StridelabError
from pipeline.models.bundled import DIGITS_FEATURES_DIR, atomic_directory
from pipeline.models.digits import load_digits_images, load_digits_labels, to_unit

DEFAULT_FEATURES_DIR = DIGITS_FEATURES_DIR
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PIXEL_SCALE = 255.0


class DigitsFeatureNet(nn.Module):
    """conv-conv-pool-conv-pool-fc CNN for 1x8x8 digits; ``forward`` returns the penultimate features.

    Args:
        channels: widths of the three 3x3 convolutions.
        feature_dim: D, the width of the feature layer (pre-activation of the hidden fc layer).
        num_classes: classifier outputs (used only in training and for accuracy).
        mean, std: normalisation of [0, 1] pixels, measured on the train split.
        dropout: dropout before the classifier head (training only).
        feature_scale: returned features are divided by it; set to the RMS feature value on the train
            split so features are O(1), as KID's cubic kernel (x.y / D + 1)^3 expects (Inception-like).
    """

    def __init__(
        self,
        channels: tuple[int, int, int] = (32, 64, 128),
        feature_dim: int = 128,
        num_classes: int = 10,
        mean: float = 0.0,
        std: float = 1.0,
        dropout: float = 0.3,
        feature_scale: float = 1.0,
    ) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.config = {
            "channels": [c1, c2, c3],
            "feature_dim": feature_dim,
            "num_classes": num_classes,
            "mean": float(mean),
            "std": float(std),
            "dropout": float(dropout),
            "feature_scale": float(feature_scale),
        }
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.fc = nn.Linear(c3 * 2 * 2, feature_dim)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)
        self.register_buffer("mean", torch.tensor(float(mean)), persistent=False)
        self.register_buffer("std", torch.tensor(float(std)), persistent=False)
        self.register_buffer("feature_scale", torch.tensor(float(feature_scale)), persistent=False)

    def set_feature_scale(self, value: float) -> None:
        """Set the divisor of the returned features (kept in ``config`` so it saves)."""
        if not value > 0:
            raise StridelabError(f"feature_scale must be > 0, got {value}")
        self.feature_scale.fill_(float(value))
        self.config["feature_scale"] = float(value)

    @property
    def feature_dim(self) -> int:
        return int(self.config["feature_dim"])

    def _prepare(self, images255: torch.Tensor) -> torch.Tensor:
        if images255.ndim != 4 or images255.shape[1] not in (1, 3) or tuple(images255.shape[2:]) != (8, 8):
            raise StridelabError(f"expected NCHW images [B, 1 or 3, 8, 8], got shape {tuple(images255.shape)}")
        x = images255.to(self.conv1.weight.dtype)  # float32, or float64 for a net in float64 (gradient checks)
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        return (x / PIXEL_SCALE - self.mean) / self.std

    def features_and_logits(self, images255: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled features [B, D] and class logits [B, num_classes] for NCHW images in [0, 255]."""
        x = F.relu(self.conv1(self._prepare(images255)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 4x4
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)  # 2x2
        feats = self.fc(x.flatten(1))
        return feats, self.head(self.drop(F.relu(feats)))

    def forward(self, images255: torch.Tensor) -> torch.Tensor:
        """Features [B, D] for NCHW float images in [0, 255] (clean-fid's extractor contract)."""
        return self.features_and_logits(images255)[0] / self.feature_scale


# ----------------------------------------------------------------------------------------------
# Loading, saving


def load_feature_net(path: str | os.PathLike | None = None) -> DigitsFeatureNet:
    """Load a feature net (eval mode, CPU) from a directory with config.json + model.safetensors.

    Args:
        path: the directory; ``None`` for the bundled ``pipeline/assets/digits/features``.
    """
    from safetensors.torch import load_file

    root = Path(path) if path is not None else DEFAULT_FEATURES_DIR
    cfg_path, w_path = root / CONFIG_FILE, root / WEIGHTS_FILE
    if not cfg_path.is_file() or not w_path.is_file():
        raise FileNotFoundError(f"no feature net in {root} (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    cfg = json.loads(cfg_path.read_text())
    net = DigitsFeatureNet(
        channels=tuple(cfg["channels"]),
        feature_dim=cfg["feature_dim"],
        num_classes=cfg["num_classes"],
        mean=cfg["mean"],
        std=cfg["std"],
        dropout=cfg.get("dropout", 0.0),
        feature_scale=cfg.get("feature_scale", 1.0),
    )
    net.load_state_dict(load_file(w_path, device="cpu"), strict=True)
    return net.eval()


def save_feature_net(net: DigitsFeatureNet, out_dir: str | os.PathLike, info: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (net config plus ``info``) atomically to ``out_dir``."""
    from safetensors.torch import save_file

    with atomic_directory(out_dir) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps({**net.config, **(info or {})}, indent=2, sort_keys=True) + "\n")
    return Path(out_dir).resolve()


# ----------------------------------------------------------------------------------------------
# Features and distances


def _check_unit_images(images01: torch.Tensor) -> None:
    if not isinstance(images01, torch.Tensor) or images01.ndim != 4:
        raise StridelabError(f"expected a tensor [B, C, 8, 8] in [0, 1], got {type(images01).__name__} "
                         f"{tuple(getattr(images01, 'shape', ()))}")
    if images01.numel() and (images01.min() < -1e-4 or images01.max() > 1.0 + 1e-4):
        raise StridelabError(f"images must lie in [0, 1]; got range [{float(images01.min()):.3f}, {float(images01.max()):.3f}]"
                         " (map model outputs with pipeline.models.digits.to_unit)")


@torch.no_grad()
def extract_features(
    images01: torch.Tensor, net: DigitsFeatureNet | None = None, batch_size: int = 512
) -> np.ndarray:
    """Features [B, D] (float64) of images [B, 1, 8, 8] in [0, 1] (``net`` defaults to the bundled one)."""
    _check_unit_images(images01)
    net = load_feature_net() if net is None else net
    net.eval()
    device = next(net.parameters()).device
    out = [
        net(images01[i : i + batch_size].to(device) * PIXEL_SCALE).double().cpu().numpy()
        for i in range(0, images01.shape[0], batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, net.feature_dim))


def _check_feats(f1: np.ndarray, f2: np.ndarray, min_rows: int) -> tuple[np.ndarray, np.ndarray]:
    f1, f2 = np.asarray(f1, dtype=np.float64), np.asarray(f2, dtype=np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise StridelabError(f"feature arrays must be [N, D] with the same D, got {f1.shape} and {f2.shape}")
    if min(len(f1), len(f2)) < min_rows:
        raise StridelabError(f"need at least {min_rows} rows per feature set, got {len(f1)} and {len(f2)}")
    return f1, f2


def fid_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (Heusel et al., 2017), via clean-fid."""
    from cleanfid.fid import frechet_distance

    f1, f2 = _check_feats(f1, f2, min_rows=2)
    mu1, s1 = f1.mean(axis=0), np.cov(f1, rowvar=False)
    mu2, s2 = f2.mean(axis=0), np.cov(f2, rowvar=False)
    return float(frechet_distance(mu1, s1, mu2, s2))


def kid_from_features(
    f1: np.ndarray, f2: np.ndarray, num_subsets: int = 100, max_subset_size: int = 1000, seed: int = 0
) -> float:
    """Kernel Inception Distance (Binkowski et al., 2018) via clean-fid's ``kernel_distance``.

    clean-fid draws its subsets from NumPy's global RNG; this seeds it with ``seed`` for the call and
    restores the previous state afterwards, so results are reproducible and callers are unaffected.
    """
    from cleanfid.fid import kernel_distance

    f1, f2 = _check_feats(f1, f2, min_rows=2)
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return float(kernel_distance(f1, f2, num_subsets=num_subsets, max_subset_size=max_subset_size))
    finally:
        np.random.set_state(state)


# ----------------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class FeatureTrainConfig:
    """Training of the feature net on the digits train split (AdamW, cosine LR, +-1 px shifts)."""

    seed: int = 0
    epochs: int = 60
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    max_shift: int = 1
    channels: tuple[int, int, int] = (32, 64, 128)
    feature_dim: int = 128
    dropout: float = 0.3

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "feature_dim"):
            if getattr(self, name) < 1:
                raise StridelabError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise StridelabError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.max_shift <= 3:
            raise StridelabError(f"max_shift must be in [0, 3], got {self.max_shift}")
        if len(self.channels) != 3:
            raise StridelabError(f"channels must have 3 entries, got {self.channels}")
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))


def _random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels (zero = background padding)."""
    if max_shift == 0:
        return x
    padded = F.pad(x, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (x.shape[0],), generator=gen)
    dy = torch.randint(0, 2 * max_shift + 1, (x.shape[0],), generator=gen)
    return torch.stack([padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8] for i in range(x.shape[0])])


@torch.no_grad()
def accuracy(net: DigitsFeatureNet, images01: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of the net's classifier head on images in [0, 1]."""
    net.eval()
    _, logits = net.features_and_logits(images01 * PIXEL_SCALE)
    return float((logits.argmax(1) == labels).float().mean())


def train_feature_net(cfg: FeatureTrainConfig) -> tuple[DigitsFeatureNet, dict[str, Any]]:
    """Train on the train split; return the net (eval mode) and a report with the test accuracy."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x_train, y_train = to_unit(load_digits_images("train")), load_digits_labels("train")
    x_test, y_test = to_unit(load_digits_images("test")), load_digits_labels("test")
    net = DigitsFeatureNet(cfg.channels, cfg.feature_dim, 10, float(x_train.mean()), float(x_train.std()), cfg.dropout)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = x_train.shape[0]
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    t0 = time.monotonic()
    step = 0
    for _epoch in range(cfg.epochs):
        net.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            xb = _random_shift(x_train[idx], cfg.max_shift, gen)
            for group in opt.param_groups:
                group["lr"] = cfg.lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
            _, logits = net.features_and_logits(xb * PIXEL_SCALE)
            loss = F.cross_entropy(logits, y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    net.eval()
    with torch.no_grad():
        raw = net.features_and_logits(x_train * PIXEL_SCALE)[0]
    net.set_feature_scale(float(raw.pow(2).mean().sqrt()))
    report = {
        "training": asdict(cfg),
        "train_accuracy": accuracy(net, x_train, y_train),
        "test_accuracy": accuracy(net, x_test, y_test),
        "test_size": int(x_test.shape[0]),
        "split": "sklearn load_digits, 80/20 stratified, random_state=0",
        "wall_time_s": round(time.monotonic() - t0, 1),
        "torch_version": torch.__version__,
        "input": "NCHW float in [0, 255]; 1 channel (3 are averaged)",
        "features": "pre-activation of the hidden fc layer / feature_scale (RMS on the train split)",
    }
    return net, report
