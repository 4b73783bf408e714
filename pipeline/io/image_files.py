"""Reading a user's images for a model: a PNG folder, a .npy array or a Parquet file, validated whole.

=============  =====================================================================================
source         what it holds
=============  =====================================================================================
PNG folder     ``*.png`` files (sorted by name), 8-bit grey (``L``, 1 channel) or ``RGB`` (3), mapped
               from [0, 255] to the model's data range; names are the file stems
``.npy``       float array [N, *sample_shape] already in the model's data range; names ``0 .. N-1``
``.parquet``   a ``sample`` column (fixed-size float lists of prod(sample_shape), model range: what
               ``stridelab sample`` writes) or else an ``image`` column (PNG bytes); names from a
               ``name`` or ``seed`` column when there is one
=============  =====================================================================================

Every image is checked before any is used (size and channels against ``sample_shape``, values inside
``data_range``, finite, each file readable), and the first bad one is a `StridelabError` naming it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import StridelabError

RANGE_SLACK = 0.25
"""Values may exceed the data range by this fraction of its width: a model's own samples overshoot it
(`stridelab sample` on bundled:digits: -1.10 .. 1.24 in [-1, 1]), while the mistakes the check is for,
such as a [0, 255] or [0, 16] array, land far outside."""

_MODES = {"L": 1, "RGB": 3}


def _png_array(data: bytes | Path, what: str, shape: Sequence[int]) -> np.ndarray:
    """One PNG as float32 [C, H, W] on [0, 1], checked against `shape` = (C, H, W)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            im.load()
            mode, size = im.mode, im.size
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise StridelabError(f"{what}: not a readable PNG ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'corrupt'})") from None
    if mode not in _MODES:
        raise StridelabError(f"{what}: PNG mode {mode!r} is not 8-bit grey (L) or RGB")
    c, h, w = shape
    if _MODES[mode] != c:
        raise StridelabError(f"{what}: has {_MODES[mode]} channel(s) ({mode}), the model takes {c}")
    if (size[1], size[0]) != (h, w):
        raise StridelabError(f"{what}: is {size[0]}x{size[1]} pixels, the model takes {w}x{h}")
    arr = arr.reshape(h, w, c).transpose(2, 0, 1)
    return arr.astype(np.float32) / 255.0


def _check_array(x: np.ndarray, what: str, shape: Sequence[int], data_range: tuple[float, float]) -> np.ndarray:
    if not np.issubdtype(x.dtype, np.floating):
        raise StridelabError(f"{what}: holds {x.dtype} values; give floats in the model's data range {list(data_range)}")
    if x.ndim != len(shape) + 1 or tuple(x.shape[1:]) != tuple(shape):
        raise StridelabError(f"{what}: has shape {list(x.shape)}, the model takes [N, {', '.join(map(str, shape))}]")
    if len(x) == 0:
        raise StridelabError(f"{what}: holds no images")
    bad = ~np.isfinite(x).reshape(len(x), -1).all(axis=1)
    if bad.any():
        raise StridelabError(f"{what}: image {int(np.argmax(bad))} has non-finite values")
    lo, hi = data_range
    slack = RANGE_SLACK * (hi - lo)
    out = (x.reshape(len(x), -1).min(axis=1) < lo - slack) | (x.reshape(len(x), -1).max(axis=1) > hi + slack)
    if out.any():
        i = int(np.argmax(out))
        raise StridelabError(f"{what}: image {i} has values in [{x[i].min():.4g}, {x[i].max():.4g}], outside the "
                             f"model's data range [{lo:g}, {hi:g}]")
    return x.astype(np.float32)


def _from_unit(u: np.ndarray, data_range: tuple[float, float]) -> np.ndarray:
    lo, hi = data_range
    return (lo + u * (hi - lo)).astype(np.float32)


def _read_parquet(p: Path, shape: Sequence[int], data_range: tuple[float, float]) -> tuple[np.ndarray, list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except (pa.ArrowException, OSError) as e:
        raise StridelabError(f"{p}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    n = table.num_rows
    names = ([str(v) for v in table.column(k).to_pylist()] if (k := next((c for c in ("name", "seed") if c in table.column_names), None))
             else [str(i) for i in range(n)])
    if "sample" in table.column_names:
        rows = table.column("sample").to_pylist()
        D = int(np.prod(shape))
        if any(r is None or len(r) != D for r in rows):
            i = next(i for i, r in enumerate(rows) if r is None or len(r) != D)
            raise StridelabError(f"{p}: sample {i} has {0 if rows[i] is None else len(rows[i])} values, the model takes "
                                 f"{D} ({'x'.join(map(str, shape))})")
        x = np.asarray(rows, dtype=np.float64).reshape(n, *shape) if n else np.zeros((0, *shape))
        return _check_array(x, str(p), shape, data_range), names
    if "image" in table.column_names:
        imgs = [_png_array(b, f"{p} row {i}", shape) for i, b in enumerate(table.column("image").to_pylist())]
        if not imgs:
            raise StridelabError(f"{p}: holds no images")
        return _from_unit(np.stack(imgs), data_range), names
    raise StridelabError(f"{p}: has no 'sample' or 'image' column (columns: {', '.join(table.column_names)})")


def read_images(path: str | os.PathLike, sample_shape: Sequence[int],
                data_range: tuple[float, float]) -> tuple[torch.Tensor, list[str]]:
    """Images for a model with per-sample shape (C, H, W) and `data_range`: float32 [N, C, H, W] in the data
    range, and one name per image (see the module docstring for the sources).

    Raises:
        StridelabError: a missing or unknown source, or the first bad image, named.
    """
    p = Path(path)
    shape = tuple(int(s) for s in sample_shape)
    if len(shape) != 3:
        raise StridelabError(f"images need a model whose samples are [C, H, W]; this one's are {list(shape)}")
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() == ".png")
        if not files:
            raise StridelabError(f"{p}: no .png files in this folder")
        u = np.stack([_png_array(f, str(f), shape) for f in files])
        return torch.from_numpy(_from_unit(u, data_range)), [f.stem for f in files]
    if not p.is_file():
        raise StridelabError(f"{p}: no such file or folder")
    suffix = p.suffix.lower()
    if suffix == ".npy":
        try:
            x = np.load(p, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise StridelabError(f"{p}: not a readable .npy array ({str(e).splitlines()[0]})") from None
        x = _check_array(x, str(p), shape, data_range)
        return torch.from_numpy(x), [str(i) for i in range(len(x))]
    if suffix == ".parquet":
        x, names = _read_parquet(p, shape, data_range)
        return torch.from_numpy(x), names
    raise StridelabError(f"{p}: expected a folder of PNGs, a .npy or a .parquet file")
