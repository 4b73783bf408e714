"""Image sources a user names on the command line: a file or folder (`pipeline.io.image_files.read_images`) or
the bundled digits (``digits:SPLIT[:N]``, `pipeline.models.digits.digits_source`)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from pipeline.io.image_files import read_images
from pipeline.models.digits import digits_source


def read_source(source: str | os.PathLike, sample_shape: Sequence[int],
                data_range: tuple[float, float]) -> tuple[torch.Tensor, list[str]]:
    """Images for a model, float32 [N, C, H, W] in `data_range`, and their names: ``digits:SPLIT[:N]`` or a PNG
    folder, ``.npy`` or ``.parquet`` file; raises `StridelabError` naming the first bad image."""
    if str(source).startswith("digits:"):
        return digits_source(str(source), tuple(int(s) for s in sample_shape), data_range)
    return read_images(source, sample_shape, data_range)
