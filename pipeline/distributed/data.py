"""Large sample sets through Ray Data, written to Parquet (+ a PNG grid) in seed order.

``generate_samples`` runs ``map_batches(SampleBatch, compute=ActorPoolStrategy(size=A))`` (or the same UDF
in this process); ``write_sample_dir`` streams its batches into ``DIR/samples.parquet`` atomically. Ray
Data's actor pool restarts and retries by default; the UDF is a pure function of its batch, so a
retried batch gives the same samples.

The driver holds at most one row group (`row_group_rows`, sized from the sample's dimension only) plus the
blocks Ray Data hands it (at most `BATCHES_PER_BLOCK` batches each, one prefetched): its memory does not
grow with the number of samples. Row groups have that fixed size whatever
the batches, so the file is byte-identical for any number of actors, batch size or retried batch.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.schedules import Schedule
from pipeline.distributed.cluster import (PlacementWatch, actor_resources, check_placement_timeout, init_ray,
                                         parse_actor_resources, threads_per_actor)
from pipeline.distributed.worker import DEFAULT_FORWARD_BATCH, Loader, SamplerWorker
from pipeline.errors import StridelabError
from pipeline.io.files import atomic_directory
from pipeline.io.images import hwc, png_bytes, tile


def _is_image(shape: Sequence[int]) -> bool:
    return len(shape) == 3 and shape[0] in (1, 3)


def to_uint8(x01: torch.Tensor) -> np.ndarray:
    """[0, 1] (clipped) -> uint8, rounding to nearest."""
    return (x01.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


class SampleBatch:
    """Ray Data UDF: ``{"data": int64 [b]} -> {"seed", "sample" float32 [b, D], "image" PNG bytes}``.

    Loads the model once (a `SamplerWorker`); seed = ``seed_offset + data`` (the sample index).
    """

    def __init__(self, model: str, timesteps: Sequence[int], eta: float = 0.0, seed_offset: int = 0,
                 solver: str = "ddim", **worker_kwargs: Any):
        self.worker = SamplerWorker(model, **worker_kwargs)
        self.timesteps = tuple(int(t) for t in timesteps)
        self.eta, self.seed_offset, self.solver = float(eta), int(seed_offset), solver

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seeds = np.asarray(batch["data"], dtype=np.int64) + self.seed_offset
        x0 = self.worker.sample(seeds.tolist(), self.timesteps, self.eta, self.solver)
        out = {"seed": seeds, "sample": x0.reshape(len(seeds), -1).numpy().astype(np.float32)}
        if _is_image(self.worker.model.sample_shape):
            u8 = to_uint8(self.worker.model.to_unit(x0))
            out["image"] = np.array([png_bytes(hwc(im)) for im in u8], dtype=object)
        return out


BATCHES_PER_BLOCK = 8
"""At most this many batches per Ray Data block: a block is what the driver receives at once."""


def sample_blocks(num_samples: int, batch_size: int, actors: int) -> int:
    """Input blocks of the seed range: 4 per actor (fewer for few batches), and more when needed to keep each
    block at most `BATCHES_PER_BLOCK` batches, so that what the driver holds does not grow with the samples."""
    batches = math.ceil(num_samples / batch_size)
    return max(1, min(4 * actors, batches), math.ceil(batches / BATCHES_PER_BLOCK))


def generate_samples(
    model: str,
    timesteps: Sequence[int],
    num_samples: int,
    *,
    seed: int = 0,
    eta: float = 0.0,
    actors: int = 2,
    batch_size: int = 256,
    loader: Loader | None = None,
    forward_batch: int = DEFAULT_FORWARD_BATCH,
    ray_address: str | None = None,
    trace_dir: str | None = None,
    num_gpus: float | None = None,
    solver: str = "ddim",
    dtype: str = "float32",
    resources: dict[str, float] | None = None,
    placement_timeout: float | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of samples of `solver` in seed order: Ray Data with an actor pool of `actors`, or in-process
    for 0. `num_gpus`: GPUs per actor, requested as given (see `actor_resources`); `dtype`: the network's
    (`pipeline.models.load.DTYPES`); `resources`: custom Ray resources per actor (`parse_actor_resources`).

    Raises:
        PlacementTimeout: at the start, no live node could host one actor for `placement_timeout` seconds
            (default 600, 0: no limit; `PlacementWatch`, the actor pool's rule): Ray Data alone would wait for ever.
    """
    resources = parse_actor_resources(resources)
    watch_timeout = check_placement_timeout(placement_timeout)
    kwargs = dict(loader=loader, forward_batch=forward_batch, trace_dir=trace_dir, dtype=dtype)
    if actors == 0:
        fn = SampleBatch(model, timesteps, eta, seed, solver, **kwargs)
        for a in range(0, num_samples, batch_size):
            yield fn({"data": np.arange(a, min(a + batch_size, num_samples), dtype=np.int64)})
        return
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    init_ray(ray_address)
    ctx = DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start)
    # The seeds go in as in-memory blocks (no read tasks, which would each need a whole CPU and can starve
    # beside the actors on a small machine); the actors share the free CPUs.
    opts = actor_resources(actors, cpu_share=0.9, gpus_per_actor=num_gpus, resources=resources)
    if "num_gpus" not in opts:
        kwargs["threads"] = threads_per_actor(actors)
    # Ray Data would wait for ever for actors no node can host; wait as the actor pool does, then stop. Checked
    # before the dataset starts, so nothing of it is left running (a node lost later is Ray Data's to retry).
    PlacementWatch(opts, watch_timeout).backoff(0)
    try:
        ctx.execution_options.preserve_order = True  # batches come back in seed order
        ctx.enable_progress_bars = False  # ours is enough
        ctx.print_on_execution_start = False
        blocks = sample_blocks(num_samples, batch_size, actors)
        ds = ray.data.from_numpy(np.array_split(np.arange(num_samples, dtype=np.int64), blocks))
        ds = ds.map_batches(
            SampleBatch,
            fn_constructor_args=(model, tuple(timesteps), eta, seed, solver),
            fn_constructor_kwargs=kwargs,
            compute=ActorPoolStrategy(size=actors),
            batch_size=batch_size,
            batch_format="numpy",
            **opts,
        )
        yield from ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1)
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start = saved


def scatter_image(points: np.ndarray, size: int = 256) -> np.ndarray:
    """Grey scatter plot (first two coordinates) of non-image samples, [size, size] uint8."""
    img = np.full((size, size), 255, dtype=np.uint8)
    p = points[:, :2] if points.shape[1] >= 2 else np.stack([points[:, 0], np.zeros(len(points))], 1)
    lo, hi = p.min(0), p.max(0)
    span = np.where(hi > lo, hi - lo, 1.0)
    ij = ((p - lo) / span * (size - 5) + 2).astype(int)
    for x, y in ij:
        img[size - 1 - y - 1 : size - 1 - y + 1, x - 1 : x + 1] = 0
    return img


def _sample_schema(schedule: Schedule, eta: float, model: str, sample_shape: Sequence[int],
                   data_range: tuple[float, float], num_samples: int, model_dtype: str = "float32") -> Any:
    """The Parquet schema of ``samples.parquet``; the run's description goes in its metadata."""
    import pyarrow as pa

    D = int(np.prod(sample_shape))
    meta = {
        "model": model, "sample_shape": list(sample_shape), "dtype": "float32", "data_range": list(data_range),
        "model_dtype": model_dtype, "schedule": schedule.to_dict(), "eta": eta, "num_samples": num_samples,
        "columns": {"sample": "x_0 in the model's data range, flattened; reshape to sample_shape",
                    "image": "PNG, uint8 = round(255 * clip((x_0 - lo) / (hi - lo), 0, 1))"},
    }
    fields = [pa.field("seed", pa.int64()), pa.field("schedule", pa.string()), pa.field("nfe", pa.int32()),
              pa.field("eta", pa.float64()), pa.field("sample", pa.list_(pa.float32(), D))]
    if _is_image(sample_shape):
        fields.append(pa.field("image", pa.binary()))
    return pa.schema(fields, metadata={"stridelab": json.dumps(meta)})


ROW_GROUP_BYTES = 4 * 2**20
"""Float data per Parquet row group of ``samples.parquet`` (the images' PNG bytes come on top)."""


def row_group_rows(D: int) -> int:
    """Rows per row group for samples of dimension `D`: ``ROW_GROUP_BYTES`` of float32, in [64, 16384]."""
    return int(min(16384, max(64, ROW_GROUP_BYTES // (4 * max(int(D), 1)))))


class _RowGroups:
    """Buffers tables and writes them as row groups of exactly `rows` rows (the last one shorter)."""

    def __init__(self, writer: Any, rows: int):
        self.writer, self.rows, self.parts, self.buffered = writer, int(rows), [], 0

    def add(self, table: Any) -> None:
        self.parts.append(table)
        self.buffered += table.num_rows
        if self.buffered >= self.rows:
            self._write(self.buffered - self.buffered % self.rows)

    def flush(self) -> None:
        if self.buffered:
            self._write(self.buffered)

    def _write(self, n: int) -> None:
        import pyarrow as pa

        table = pa.concat_tables(self.parts).combine_chunks()
        self.writer.write_table(table.slice(0, n), row_group_size=self.rows)
        rest = table.slice(n)
        self.parts, self.buffered = ([rest] if rest.num_rows else []), rest.num_rows


def _write_parquet(path: Path, schema: Any, batches: Iterator[dict[str, np.ndarray]], *, num_samples: int,
                   first_seed: int, schedule: Schedule, eta: float, D: int, keep: int, progress: bool,
                   row_group: int | None = None) -> np.ndarray:
    """Stream `batches` into `path` in row groups of `row_group` rows (default `row_group_rows`), checking they
    come in seed order; returns the first `keep` samples [k, D]."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pipeline.io.console import progress as progress_bar

    grid: list[np.ndarray] = []
    expected = int(first_seed)
    with pq.ParquetWriter(path, schema) as w, \
            progress_bar(num_samples, "sampling", unit="sample", enabled=progress) as bar:
        groups = _RowGroups(w, row_group or row_group_rows(D))
        for b in batches:
            seeds = np.asarray(b["seed"], dtype=np.int64)
            if len(seeds) == 0:
                continue
            if not np.array_equal(seeds, np.arange(expected, expected + len(seeds))):
                raise StridelabError(f"samples arrived out of seed order near seed {int(seeds[0])}")
            expected = int(seeds[-1]) + 1
            x = np.asarray(b["sample"], dtype=np.float32).reshape(len(seeds), D)
            cols = [pa.array(seeds), pa.array([schedule.name] * len(seeds)),
                    pa.array(np.full(len(seeds), schedule.nfe, dtype=np.int32)),
                    pa.array(np.full(len(seeds), float(eta))),
                    pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), D)]
            if "image" in schema.names:
                cols.append(pa.array(list(b["image"]), type=pa.binary()))
            groups.add(pa.Table.from_arrays(cols, schema=schema))
            if sum(len(g) for g in grid) < keep:
                grid.append(x[: keep - sum(len(g) for g in grid)].copy())
            bar.update(len(seeds))
        groups.flush()
    got = expected - int(first_seed)
    if got != num_samples:
        raise StridelabError(f"expected {num_samples} samples, wrote {got}")
    return np.concatenate(grid) if grid else np.zeros((0, D), np.float32)


def _grid_image(first: np.ndarray, sample_shape: Sequence[int], data_range: tuple[float, float]) -> np.ndarray:
    """uint8 preview: a tile of the first 64 images, or a scatter plot of non-image samples."""
    if _is_image(sample_shape):
        lo, hi = data_range
        images01 = (torch.from_numpy(first).reshape(-1, *sample_shape) - lo) / (hi - lo)
        return tile(images01[:64], cols=8, scale=4)
    return scatter_image(first)


def write_sample_dir(
    out_dir: str | os.PathLike,
    batches: Iterator[dict[str, np.ndarray]],
    *,
    num_samples: int,
    first_seed: int,
    schedule: Schedule,
    eta: float,
    model: str,
    sample_shape: Sequence[int],
    data_range: tuple[float, float],
    grid_size: int = 64,
    progress: bool = True,
    model_dtype: str = "float32",
    row_group: int | None = None,
) -> Path:
    """Stream batches into ``DIR/samples.parquet`` (+ ``grid.png``, ``schedule.json``), atomically.

    Everything is written into a temporary directory beside DIR and renamed into place at the end
    (`pipeline.io.files.atomic_directory`); on any failure the temporary directory is removed and DIR is
    untouched. Columns: seed int64, schedule string, nfe int32, eta float64, sample
    fixed_size_list<float32>[D] (model range; shape and dtype in the schema metadata), and image (PNG,
    uint8 from [0, 1]) for images; `model_dtype` (the network's) goes in the metadata. Row groups of `row_group`
    rows (default `row_group_rows`: fixed by the sample's size, so the bytes do not depend on the batches).
    Raises `StridelabError` when the batches are not `num_samples` consecutive seeds from `first_seed`.
    """
    from PIL import Image

    target = Path(out_dir).resolve()
    D = int(np.prod(sample_shape))
    schema = _sample_schema(schedule, eta, model, sample_shape, data_range, num_samples, model_dtype)
    keep = grid_size if _is_image(sample_shape) else 4096  # points for the scatter plot
    with atomic_directory(target) as tmp:
        first = _write_parquet(tmp / "samples.parquet", schema, batches, num_samples=num_samples,
                               first_seed=first_seed, schedule=schedule, eta=eta, D=D, keep=keep, progress=progress,
                               row_group=row_group)
        Image.fromarray(_grid_image(first, sample_shape, data_range)).save(tmp / "grid.png")
        schedule.save(tmp / "schedule.json")
    return target
