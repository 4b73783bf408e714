"""FID / KID of samples computed in pieces (on Ray actors), assembled on the driver.

FID (Heusel et al., 2017) needs only the mean and covariance of the generated features. The workers return
their shards' feature rows (float64 [b, D]), and the driver computes the moments once over all rows in seed
order (`FeatureStats.of`), so FID is bit-identical for 1, 2 or N actors. (Adding per-shard moments, which
`FeatureStats` also supports, equals ``np.mean`` / ``np.cov`` to ~1e-12 but its last bits depend on the
split: measured 13.498853391 vs 13.498853267 on 1 and 3 actors.) The driver holds n x D floats, as clean-fid
itself does (50,000 Inception rows: 0.8 GB). Sums are taken of ``f - shift`` with the reference mean as
shift, which keeps ``S2 - S1 S1^T / n`` free of cancellation.

KID (Binkowski et al., 2018) is not a function of low-order moments: the driver calls clean-fid's
``kernel_distance`` on the same rows.

Feature extractors (``FEATURES``), each ``images01 [B, C, H, W] in [0, 1] -> float64 [B, D]``:

- ``digits[:DIR]``: the small digits CNN of `pipeline.metrics.features` (bundled weights, or the net in DIR).
- ``pixels``: the raw [0, 1] values, flattened: a weak but exact metric for any sample shape
  (e.g. the 2-D ``gmm:ring8``), where "FID" is the Frechet distance of the data itself.
- ``inception``: clean-fid's Inception-v3 in ``clean`` mode (PIL bicubic resize to 299), for real
  images. Its weights and reference statistics download at run time; offline that is one
  `StridelabError` saying how to pre-fetch them.

Reference sets (``--fid-ref``): ``digits[:SPLIT]`` (bundled digits, default split ``all``), ``model``
(exact draws from an analytic model, e.g. ``gmm:*``), ``cleanfid:NAME:RES[:SPLIT]`` (clean-fid's
precomputed Inception statistics).
"""

from __future__ import annotations

import contextlib
import socket
import urllib.error
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from pipeline.errors import StridelabError

FeatureFn = Callable[[torch.Tensor], np.ndarray]
FEATURES: tuple[str, ...] = ("digits", "pixels", "inception")
INCEPTION_DIR = "/tmp"  # where clean-fid looks for inception-2015-12-05.pt (non-Windows)
DOWNLOAD_TIMEOUT_S = 20.0


# --------------------------------------------------------------------------------------------------
# Sufficient statistics


@dataclass(frozen=True)
class FeatureStats:
    """Sums of shifted features: ``n``, ``s1 = sum (f - shift)`` [D], ``s2 = sum (f - shift)(f - shift)^T`` [D, D].

    All float64. Merging is addition (`merge`), so any partition of the rows gives the same moments
    up to float64 rounding, and the same partition merged in the same order gives the same bits.
    """

    n: int
    s1: np.ndarray
    s2: np.ndarray
    shift: np.ndarray

    @classmethod
    def of(cls, feats: np.ndarray, shift: np.ndarray | None = None) -> "FeatureStats":
        """Statistics of the rows of `feats` [n, D]."""
        f = np.asarray(feats, dtype=np.float64)
        if f.ndim != 2:
            raise StridelabError(f"features must be [n, D], got shape {f.shape}")
        c = np.zeros(f.shape[1]) if shift is None else np.asarray(shift, dtype=np.float64)
        if c.shape != (f.shape[1],):
            raise StridelabError(f"shift has shape {c.shape}, features have D = {f.shape[1]}")
        d = f - c
        return cls(int(f.shape[0]), d.sum(axis=0), d.T @ d, c)

    def __add__(self, other: "FeatureStats") -> "FeatureStats":
        if self.s1.shape != other.s1.shape or not np.array_equal(self.shift, other.shift):
            raise StridelabError("cannot merge feature statistics with different dimensions or shifts")
        return FeatureStats(self.n + other.n, self.s1 + other.s1, self.s2 + other.s2, self.shift)

    @staticmethod
    def merge(parts: Iterable["FeatureStats"]) -> "FeatureStats":
        """Left-to-right sum of the parts (pass them in seed order for bit-reproducible results)."""
        it = iter(parts)
        try:
            total = next(it)
        except StopIteration:
            raise StridelabError("no feature statistics to merge") from None
        for p in it:
            total = total + p
        return total

    def mean(self) -> np.ndarray:
        """mu = shift + S1 / n (as ``np.mean(f, axis=0)``)."""
        return self.shift + self.s1 / self.n

    def cov(self) -> np.ndarray:
        """Unbiased covariance (S2 - S1 S1^T / n) / (n - 1) (as ``np.cov(f, rowvar=False)``)."""
        if self.n < 2:
            raise StridelabError(f"a covariance needs at least 2 samples, got {self.n}")
        return (self.s2 - np.outer(self.s1, self.s1) / self.n) / (self.n - 1)


def frechet_distance(stats: FeatureStats, ref_mu: np.ndarray, ref_sigma: np.ndarray) -> float:
    """FID between the Gaussian of `stats` and a reference (mu, sigma), via clean-fid's ``frechet_distance``."""
    from cleanfid.fid import frechet_distance as _fd

    return float(_fd(stats.mean(), stats.cov(), ref_mu, ref_sigma))


def kid(feats: np.ndarray, ref_feats: np.ndarray, seed: int = 0) -> float:
    """KID via clean-fid's ``kernel_distance`` (seeded subsets; see `pipeline.metrics.features.kid_from_features`)."""
    from pipeline.metrics.features import kid_from_features

    return kid_from_features(feats, ref_feats, seed=seed)


# --------------------------------------------------------------------------------------------------
# Feature extractors (built once per worker)


def parse_features(spec: str) -> tuple[str, str | None]:
    """'digits:/path' -> ('digits', '/path'); raises naming the allowed kinds."""
    kind, _, arg = spec.partition(":")
    if kind not in FEATURES:
        raise StridelabError(f"unknown feature extractor {spec!r}; choose one of {', '.join(FEATURES)} (digits:DIR)")
    if arg and kind != "digits":
        raise StridelabError(f"feature extractor {kind!r} takes no argument, got {spec!r}")
    return kind, arg or None


def make_feature_fn(spec: str, device: torch.device | str = "cpu") -> FeatureFn:
    """A feature extractor ``images01 [B, C, H, W] -> float64 [B, D]`` from a spec (see module docstring)."""
    kind, arg = parse_features(spec)
    if kind == "pixels":
        return lambda x: x.detach().double().flatten(1).cpu().numpy()
    if kind == "digits":
        from pipeline.metrics.features import extract_features, load_feature_net

        try:
            net = load_feature_net(arg).to(device)
        except FileNotFoundError as e:
            raise StridelabError(f"{e}; train one with `stridelab train features` or pass digits:DIR") from None
        return lambda x: extract_features(x.clamp(0, 1), net)
    return _inception_feature_fn(device)


@contextlib.contextmanager
def _offline_guard(what: str) -> Iterator[None]:
    """Turn clean-fid's download failures (or a stalled connection) into one actionable line."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        yield
    except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise StridelabError(
            f"clean-fid's {what} cannot be downloaded offline ({reason}); pre-fetch them on a machine with "
            f"internet: python -c \"from cleanfid.features import build_feature_extractor, get_reference_statistics; "
            f"build_feature_extractor('clean', device='cpu'); get_reference_statistics(NAME, RES, split=SPLIT)\" "
            f"and copy {INCEPTION_DIR}/inception-2015-12-05.pt and cleanfid/stats/*.npz to the same places here"
        ) from None
    finally:
        socket.setdefaulttimeout(old)


def ensure_inception_weights() -> str:
    """Path of clean-fid's Inception weights, downloading them if missing (StridelabError when offline)."""
    from cleanfid import downloads_helper

    with _offline_guard("Inception weights"):
        return downloads_helper.check_download_inception(fpath=INCEPTION_DIR)


def _inception_feature_fn(device: torch.device | str) -> FeatureFn:
    from cleanfid.features import build_feature_extractor
    from cleanfid.resize import build_resizer

    ensure_inception_weights()
    with _offline_guard("Inception weights"):
        model = build_feature_extractor("clean", device=torch.device(device), use_dataparallel=False)
    resize = build_resizer("clean")

    def fn(x01: torch.Tensor) -> np.ndarray:
        # clean-fid's get_model_features: images in [0, 255], each resized on the CPU with PIL bicubic.
        img = (x01.clamp(0, 1) * 255).cpu()
        if img.shape[1] == 1:
            img = img.expand(-1, 3, -1, -1)
        batch = torch.stack([torch.tensor(resize(im.numpy().transpose(1, 2, 0)).transpose(2, 0, 1)) for im in img])
        with torch.no_grad():
            return model(batch.to(device)).double().cpu().numpy()

    return fn


# --------------------------------------------------------------------------------------------------
# Reference statistics (computed once per process)


@dataclass(frozen=True)
class Reference:
    """What generated features are compared with: (mu, sigma) for FID and, when known, rows for KID."""

    name: str
    mu: np.ndarray
    sigma: np.ndarray
    feats: np.ndarray | None = None


def parse_reference(spec: str) -> tuple[str, tuple[str, ...]]:
    kind, _, rest = spec.partition(":")
    args = tuple(a for a in rest.split(":") if a) if rest else ()
    if kind == "digits" and len(args) <= 1:
        from pipeline.models.digits import SPLITS

        if args and args[0] not in SPLITS:
            raise StridelabError(f"unknown digits split {args[0]!r}; choose one of {', '.join(SPLITS)}")
        return kind, args or ("all",)
    if kind == "model" and not args:
        return kind, ()
    if kind == "cleanfid" and len(args) in (2, 3) and args[1].isdigit():
        return kind, args if len(args) == 3 else (*args, "train")
    raise StridelabError(f"bad FID reference {spec!r}; use digits[:SPLIT], model or cleanfid:NAME:RES[:SPLIT]")


def features_in_chunks(fn: FeatureFn, images01: torch.Tensor, size: int) -> np.ndarray:
    """`fn` on fixed-size chunks (the last one padded), so a row's features never depend on batching."""
    from pipeline.core.batching import run_fixed_batches

    if images01.shape[0] == 0:
        return np.zeros((0, 0))
    return run_fixed_batches(lambda x: torch.from_numpy(np.asarray(fn(x))), [images01], size).numpy()


@lru_cache(maxsize=8)
def digits_reference(split: str, features: str, chunk: int = 64) -> Reference:
    """Features of the bundled digits split (cached for the life of the process)."""
    from pipeline.models.digits import load_digits_images, to_unit

    f = features_in_chunks(make_feature_fn(features), to_unit(load_digits_images(split)), chunk)
    return Reference(f"digits:{split}", f.mean(axis=0), np.cov(f, rowvar=False), f)


def cleanfid_reference(name: str, res: int, split: str = "train", kid: bool = False) -> Reference:
    """clean-fid's precomputed Inception statistics (``clean`` mode) for a named dataset."""
    from cleanfid.features import get_reference_statistics

    with _offline_guard(f"reference statistics for {name}/{res}/{split}"):
        mu, sigma = get_reference_statistics(name, res, mode="clean", split=split, metric="FID")
        feats = get_reference_statistics(name, res, mode="clean", split=split, metric="KID") if kid else None
    return Reference(f"cleanfid:{name}:{res}:{split}", mu, sigma, feats)


def model_reference(data01: torch.Tensor, features: str, chunk: int = 64) -> Reference:
    """Reference from exact data draws (already on [0, 1]) of an analytic model."""
    f = features_in_chunks(make_feature_fn(features), data01, chunk)
    return Reference("model", f.mean(axis=0), np.cov(f, rowvar=False), f)


def default_features(sample_shape: Sequence[int]) -> str:
    """digits for [1, 8, 8] samples, inception for other images, pixels for anything else."""
    shape = tuple(sample_shape)
    if shape == (1, 8, 8):
        return "digits"
    if len(shape) == 3 and shape[0] in (1, 3) and min(shape[1:]) >= 16:
        return "inception"
    return "pixels"
