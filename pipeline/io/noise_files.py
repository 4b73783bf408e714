"""The noise file `stridelab invert` writes and `stridelab interpolate --noise` reads.

Two formats, one content: per image its name, its code x_T (at the noise level of ``timestep``, the
encoder's last), its reconstruction and its round-trip MSE; plus the run's description (model, encoder
and decoder lists) as JSON metadata.

- ``.safetensors``: tensors ``noise`` and ``reconstruction`` [N, *sample_shape] (float32); metadata key
  ``stridelab`` (JSON with ``names``, ``mse`` and the description).
- ``.parquet``: one row per image, columns ``name``, ``mse``, ``noise`` and ``reconstruction``
  (fixed-size float32 lists, flattened); schema metadata ``stridelab`` (the description, with
  ``sample_shape``).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import StridelabError
from pipeline.io.files import atomic_write_bytes

NOISE_FORMATS = ("safetensors", "parquet")


def write_noise(path: str | os.PathLike, noise: torch.Tensor, reconstruction: torch.Tensor, names: Sequence[str],
                mse: Sequence[float], meta: Mapping[str, Any]) -> Path:
    """Write the noise file atomically; the format follows the suffix (`NOISE_FORMATS`)."""
    path = Path(path)
    names, mse = [str(n) for n in names], [float(v) for v in mse]
    desc = {**dict(meta), "sample_shape": list(noise.shape[1:])}
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        tensors = {"noise": noise.detach().float().cpu().contiguous(),
                   "reconstruction": reconstruction.detach().float().cpu().contiguous()}
        return atomic_write_bytes(path, save(tensors, metadata={"stridelab": json.dumps({**desc, "names": names, "mse": mse})}))
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        D = int(np.prod(noise.shape[1:]))
        flat = lambda t: pa.FixedSizeListArray.from_arrays(pa.array(t.detach().float().cpu().numpy().ravel()), D)  # noqa: E731
        table = pa.table({"name": names, "mse": mse, "noise": flat(noise), "reconstruction": flat(reconstruction)})
        table = table.replace_schema_metadata({"stridelab": json.dumps(desc)})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        return atomic_write_bytes(path, buf.getvalue())
    raise StridelabError(f"must end in .{' or .'.join(NOISE_FORMATS)}, got {path.name!r}", param="noise_path")


def read_noise(path: str | os.PathLike) -> tuple[torch.Tensor, list[str], dict[str, Any]]:
    """(noise [N, *sample_shape] float32, names, description) from a file `write_noise` wrote."""
    import pyarrow as pa
    from safetensors import SafetensorError

    p = Path(path)
    if not p.is_file():
        raise StridelabError(f"{p}: no such file")
    try:
        if p.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(p), framework="pt") as f:
                desc = json.loads((f.metadata() or {})["stridelab"])
                noise = f.get_tensor("noise")
            return noise, [str(n) for n in desc.pop("names")], desc
        if p.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(p)
            desc = json.loads(table.schema.metadata[b"stridelab"])
            rows = table.column("noise").to_pylist()
            noise = torch.tensor(np.asarray(rows, dtype=np.float32).reshape(len(rows), *desc["sample_shape"]))
            return noise, [str(n) for n in table.column("name").to_pylist()], desc
    except (KeyError, TypeError, ValueError, OSError, SafetensorError, pa.ArrowException) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise StridelabError(f"{p}: not a noise file written by `stridelab invert` ({type(e).__name__}: {first})") from None
    raise StridelabError(f"{p}: expected a .safetensors or .parquet noise file")
