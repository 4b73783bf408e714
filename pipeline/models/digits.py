"""scikit-learn's 8x8 handwritten digits (``load_digits``), as a tiny offline image data set.

The data ships inside scikit-learn (1,797 images, grey levels 0..16), so nothing is downloaded.

Notation:

=========  =========================================================
``x``      images in the model range [-1, 1], shape [N, 1, 8, 8]
``u``      the same images on the unit range [0, 1] (``to_unit``)
``y``      integer class labels 0..9, shape [N]
=========  =========================================================

The train/test split is fixed: 80/20, stratified by label, ``random_state=0`` (360 test images).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Literal

import numpy as np
import torch

from pipeline.errors import StridelabError

Split = Literal["all", "train", "test"]
SPLITS: tuple[str, ...] = ("all", "train", "test")

IMAGE_SIZE = 8
MAX_GREY = 16.0
TEST_FRACTION = 0.2
SPLIT_SEED = 0


@lru_cache(maxsize=1)
def _raw() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (images [N,8,8] float32 in 0..16, labels [N], train_idx, test_idx); cached."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = bunch.images.astype(np.float32)
    labels = bunch.target.astype(np.int64)
    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(
        idx, test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    return images, labels, np.sort(train_idx), np.sort(test_idx)


def _indices(split: Split) -> np.ndarray:
    if split not in SPLITS:
        raise StridelabError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    images, _, train_idx, test_idx = _raw()
    if split == "all":
        return np.arange(len(images))
    return train_idx if split == "train" else test_idx


def load_digits_images(split: Split = "all") -> torch.Tensor:
    """Digit images of one split as float32 [N, 1, 8, 8] in [-1, 1] (grey / 16 * 2 - 1).

    Args:
        split: ``"all"`` (1,797), ``"train"`` (1,437) or ``"test"`` (360).

    Returns:
        A new tensor (safe to modify).
    """
    images = _raw()[0][_indices(split)]
    x = torch.from_numpy(images.copy()).unsqueeze(1)
    return x / MAX_GREY * 2.0 - 1.0


def load_digits_labels(split: Split = "all") -> torch.Tensor:
    """Integer labels 0..9 as int64 [N], in the same order as ``load_digits_images(split)``."""
    labels = _raw()[1][_indices(split)]
    return torch.from_numpy(labels.copy())


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Map model range [-1, 1] to [0, 1], clamping what falls outside."""
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def from_unit(u: torch.Tensor) -> torch.Tensor:
    """Map [0, 1] to the model range [-1, 1]."""
    return u * 2.0 - 1.0


def digits_source(spec: str, shape: tuple[int, ...], data_range: tuple[float, float]
                  ) -> tuple[torch.Tensor, list[str]]:
    """``digits:SPLIT[:N]`` (an image source of `stridelab invert`): the first N images of a split, float32
    [N, 1, 8, 8] in `data_range` (a model's), and their names ``digits-SPLIT-i``."""
    _, split, *rest = spec.split(":")
    if split not in SPLITS or len(rest) > 1 or (rest and not rest[0].isdigit()):
        raise StridelabError(f"{spec}: expected digits:SPLIT[:N] with SPLIT train, test or all and N a count")
    if shape != (1, 8, 8):
        raise StridelabError(f"{spec}: the digits are 1 x 8 x 8; this model's samples are {list(shape)}")
    x = load_digits_images(split)  # type: ignore[arg-type]
    n = int(rest[0]) if rest else len(x)
    if not 1 <= n <= len(x):
        raise StridelabError(f"{spec}: the {split} split has {len(x)} images, asked for {n}")
    lo, hi = data_range
    return (lo + (x[:n] + 1.0) / 2.0 * (hi - lo)).float(), [f"digits-{split}-{i}" for i in range(n)]


DATA_SEED_BLOCK = 1_000_000
"""Data seeds are read in blocks of this size by `data_index` (the sweep's seed offsets,
`search.sweep.config.HOLDOUT_OFFSET` and ``VALIDATION_OFFSET``, are blocks 1 and 2; a test pins them)."""
VALIDATION_IMAGES = 360
"""The last this-many train images are the validation part (as many as the test split); the rest (1,077) tuning."""
DATA_PARTS: tuple[str, ...] = ("tuning", "test", "validation")
"""Block b of the data seeds names images of part ``DATA_PARTS[b]``."""


def data_index(seed: int) -> tuple[str, int]:
    """The digit image a data seed names, as (split, index in that split): a documented deterministic split.

    ``seed = block * DATA_SEED_BLOCK + i`` names image i of a part: block 0 (a sweep's tuning seeds) the tuning
    part ``train[:-VALIDATION_IMAGES]``, block 1 (held-out) ``test``, block 2 (validation) the validation part
    ``train[-VALIDATION_IMAGES:]``. The three parts are disjoint, so are the images of the three seed ranges.
    Raises `StridelabError` past a part's end (no wrapping: it would reuse an image) or for another block.
    """
    block, i = divmod(int(seed), DATA_SEED_BLOCK)
    if seed < 0 or block >= len(DATA_PARTS):
        raise StridelabError(f"data seed {seed}: the digits name images by seeds in [0, {len(DATA_PARTS) * DATA_SEED_BLOCK}) "
                             f"(blocks of {DATA_SEED_BLOCK}: {', '.join(DATA_PARTS)})")
    n_train = len(_indices("train"))
    split, first, n = [("train", 0, n_train - VALIDATION_IMAGES), ("test", 0, len(_indices("test"))),
                       ("train", n_train - VALIDATION_IMAGES, VALIDATION_IMAGES)][block]
    if i >= n:
        raise StridelabError(f"data seed {seed} asks for image {i} of the digits {DATA_PARTS[block]} images, which "
                             f"number {n}: use fewer seeds (`num_seeds`, `validation_seeds`, `holdout_seeds`) or a smaller `seed`")
    return split, first + i


def data_for_seeds(seeds: Sequence[int]) -> torch.Tensor:
    """The digit images named by `seeds` (`data_index`), float32 [B, 1, 8, 8] in [-1, 1], in order."""
    where = [data_index(s) for s in seeds]
    splits = {sp: load_digits_images(sp) for sp in {sp for sp, _ in where}}  # type: ignore[arg-type]
    return torch.stack([splits[sp][i] for sp, i in where]) if where else torch.empty(0, 1, IMAGE_SIZE, IMAGE_SIZE)
