"""A user's own images as the data of an inversion sweep: split once into tuning, validation and held-out parts.

The images (a PNG folder, ``.npy`` or ``.parquet``, read by `pipeline.models.sources.read_source`) are split by a
fixed permutation (`split_parts`), so the same files always give the same parts whatever their order on disk
is sorted by (a folder sorted by class still spreads every class over the three parts). The sweep names images
by seed as for the bundled digits (`pipeline.models.digits.data_index`): tuning seeds ``s + i`` name image i of
the tuning part, held-out seeds ``s + HOLDOUT_OFFSET + i`` the held-out part, validation seeds
``s + VALIDATION_OFFSET + i`` the validation part, so the three seed ranges never share an image.

=============  =======================================================================
part           share of the N images (each at least `MIN_PART` images)
=============  =======================================================================
held-out       ``round(HOLDOUT_SHARE * N)``: only the final table
validation     ``round(VALIDATION_SHARE * N)``: chooses the exported trial
tuning         the rest: every trial
=============  =======================================================================
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.errors import StridelabError

HOLDOUT_SHARE = 0.2
VALIDATION_SHARE = 0.2
MIN_PART = 2
"""Each part holds at least this many images (a paired interval needs two)."""
MIN_IMAGES = 10
"""Fewest images a sweep accepts: 2 held-out, 2 validation and 6 tuning (the pruning screen needs some of them)."""
SPLIT_SEED = 0
"""Seed of the fixed permutation that splits the images (numpy's PCG64)."""
PARTS = ("tuning", "holdout", "validation")
"""Seed block b names images of part ``PARTS[b]`` (blocks of `search.sweep.config.HOLDOUT_OFFSET`)."""


def split_parts(n: int) -> dict[str, np.ndarray]:
    """Indices of the tuning, validation and held-out parts of `n` images: disjoint, together all of them,
    each sorted, from one fixed permutation (`SPLIT_SEED`). Raises `StridelabError` below `MIN_IMAGES`."""
    if n < MIN_IMAGES:
        raise StridelabError(f"a sweep on your images needs at least {MIN_IMAGES} of them ({MIN_PART} held-out, "
                             f"{MIN_PART} validation, the rest tuning), got {n}")
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_hold = max(MIN_PART, round(HOLDOUT_SHARE * n))
    n_val = max(MIN_PART, round(VALIDATION_SHARE * n))
    return {"holdout": np.sort(perm[:n_hold]), "validation": np.sort(perm[n_hold:n_hold + n_val]),
            "tuning": np.sort(perm[n_hold + n_val:])}


@dataclass(frozen=True)
class SweepData:
    """The images of a sweep in their parts, drawn by seed (``sample_data(seeds)``, the contract of models with data).

    Attributes:
        source: where the images came from (a path), for logs and provenance.
        parts: part name -> float32 [n, C, H, W] in the model's data range.
        base_seed: the sweep's `seed`: seed ``base_seed + block * block_size + i`` names image i of ``PARTS[block]``.
        block_size: the sweep's seed block (`search.sweep.config.HOLDOUT_OFFSET`).
        digest: sha256 (16 hex digits) of all images in file order: the study records it, so a resumed sweep on
            other images is refused.
    """

    source: str
    parts: dict[str, torch.Tensor]
    base_seed: int
    block_size: int
    digest: str

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.parts.items()}

    def __call__(self, seeds: Sequence[int]) -> torch.Tensor:
        """The images `seeds` name, float32 [B, C, H, W], in order; raises past a part's end (no reuse)."""
        rows = []
        for s in seeds:
            block, i = divmod(int(s) - self.base_seed, self.block_size)
            if int(s) < self.base_seed or block >= len(PARTS):
                raise StridelabError(f"data seed {s} names no image of {self.source}")
            part = self.parts[PARTS[block]]
            if i >= len(part):
                raise StridelabError(f"data seed {s} asks for image {i} of the {len(part)} {PARTS[block]} images of "
                                     f"{self.source}")
            rows.append(part[i])
        first = next(iter(self.parts.values()))
        return torch.stack(rows) if rows else first[:0].clone()


def load_sweep_data(source: str, sample_shape: Sequence[int], data_range: tuple[float, float], base_seed: int,
                    block_size: int) -> SweepData:
    """Read `source` for a model (`read_source`: one line naming the first bad image) and split it (`split_parts`)."""
    from pipeline.models.sources import read_source

    x, _ = read_source(source, sample_shape, data_range)
    idx = split_parts(len(x))
    digest = hashlib.sha256(np.ascontiguousarray(x.numpy()).tobytes()).hexdigest()[:16]
    return SweepData(str(source), {k: x[torch.from_numpy(v)].contiguous() for k, v in idx.items()},
                     int(base_seed), int(block_size), digest)


def attach(model: Any, data: SweepData) -> Any:
    """Make `model` draw `data` (``denoiser.sample_data``): a finite dataset, so FID keeps its own reference."""
    model.denoiser.sample_data = data
    model.denoiser.sample_data_is_a_dataset = True
    return model


@dataclass(frozen=True)
class LoaderWithData:
    """A `pipeline.distributed.worker.Loader` that loads the model as usual and attaches `data`: each Ray actor
    (or the in-process worker) draws the same images by seed as the driver does."""

    data: SweepData

    def __call__(self, spec: str, device: Any, dtype: Any) -> Any:
        from pipeline.models.load import load_model

        return attach(load_model(spec, device, dtype), self.data)
