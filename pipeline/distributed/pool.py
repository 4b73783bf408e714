"""Sampling and schedule evaluation on a pool of Ray actors (or in this process), bit-identical to one process.

Two entry points:

- `SamplerPool`: a resident pool of `SamplerWorker` actors for repeated evaluation (the Optuna search).
  ``pool.evaluate(schedules) -> list[ScheduleResult]`` has exactly the contract of
  `pipeline.evaluation.inprocess.InProcessEvaluator.evaluate`. The seeds are split into one contiguous shard per
  actor; each actor computes the many-step DDIM teacher of its shard once and keeps it (optionally also
  on disk), so a sweep pays for the teacher once.
- `generate_samples` / `write_sample_dir`: large sample sets through Ray Data
  (``map_batches(SampleBatch, compute=ActorPoolStrategy(size=A))``), in seed order, to Parquet.

Why results do not depend on the number of actors or the batch size:

1. Randomness is per sample (`pipeline.core.seeds`): x_T and the per-step noise of sample i come from a CPU
   generator seeded with seed i.
2. The network is always called on batches of exactly ``forward_batch`` rows (`run_fixed_batches` pads
   the last one). A CPU convolution's result for a row depends on the batch *size* it runs in (kernel
   choice), not on the row's position or neighbours, so a fixed size makes every row's output
   independent of how the seeds were split. The DDIM arithmetic between network calls is elementwise.
3. Workers return per-sample values; the driver concatenates them in seed order.

Fault tolerance: pool actors run with ``max_restarts`` / ``max_task_retries``; every worker method is a
pure function of its arguments (the teacher cache is rebuilt on demand), so Ray re-running a task on a
restarted actor gives the same answer. Ray Data's actor pool restarts and retries by default.

Resources are set where actors are launched: one GPU each when the cluster has GPUs, otherwise a
fraction of a CPU (on 2 cores whole-CPU actors starve Ray Data's read tasks and the pipeline hangs).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.solvers.ddim import ddim_sample
from pipeline.core.batching import BatchInvariant, run_fixed_batches
from pipeline.io.images import tile
from pipeline.io.files import replace_directory
from pipeline.errors import StridelabError
from pipeline.evaluation.inprocess import ScheduleResult
from pipeline.metrics.recon import inversion_errors, per_sample_mse
from pipeline.models.load import LoadedModel, load_model
from pipeline.core.schedules import Schedule, uniform, validate_timesteps
from pipeline.core.seeds import initial_noise

DEFAULT_FORWARD_BATCH = 64
EXTRA_METRICS: tuple[str, ...] = ("fid", "kid")
Loader = Callable[[str, Any, Any], LoadedModel]


# --------------------------------------------------------------------------------------------------
# Ray set-up


def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to Ray: `address` or ``$RAY_ADDRESS`` when given, else start a local instance.

    Does nothing when Ray is already initialised. Returns True when this call started or connected
    (the caller then owns the shutdown).
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                 log_to_driver=True, logging_level="warning")
    else:
        ray.init(address=address, logging_level="warning")
    return True


def check_gpus_per_actor(gpus_per_actor: float | None, actors: int) -> None:
    """The one check of a per-actor GPU request: in (0, 8] (fractions pack actors), and only with actors."""
    if gpus_per_actor is None:
        return
    if not 0 < float(gpus_per_actor) <= 8:
        raise StridelabError(f"must be in (0, 8], got {gpus_per_actor}", param="gpus_per_actor")
    if actors < 1:
        raise StridelabError("needs Ray actors (`actors` >= 1)", param="gpus_per_actor")


def actor_resources(actors: int, *, reserve_cpus: float = 0.0, cpu_share: float = 1.0,
                    gpus_per_actor: float | None = None) -> dict[str, float]:
    """Ray resources for each of `actors` sampler actors on the current cluster.

    `gpus_per_actor` given: exactly that many GPUs (and one CPU) per actor, whatever the cluster has now;
    on an autoscaling cluster this is the request that makes it start GPU nodes (sizing from the GPUs
    present would fall back to CPU actors on a cluster scaled to zero).

    One GPU (and one CPU) each when the cluster has at least `actors` GPUs (an equal share of them when it
    has fewer, so the pool never waits for GPUs that do not exist); otherwise ``cpu_share`` of the CPUs that are
    free now, less `reserve_cpus`, split evenly and rounded down to 1/100 (at most 1, at least 0.01).
    Sizing from the free CPUs means a second pool (or a Ray Data job) still fits beside the first,
    instead of waiting forever for CPUs the first one holds.
    """
    if gpus_per_actor is not None:
        check_gpus_per_actor(gpus_per_actor, actors)
        return {"num_gpus": float(gpus_per_actor), "num_cpus": 1.0}
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0))
    if gpus >= 1:
        return {"num_gpus": min(1.0, math.floor(100 * gpus / actors) / 100), "num_cpus": 1.0}
    free = float(ray.available_resources().get("CPU", 0.0))
    cpus = max(free - reserve_cpus, 0.01)
    return {"num_cpus": max(0.01, math.floor(100 * min(1.0, cpu_share * cpus / actors)) / 100)}


def threads_per_actor(actors: int) -> int:
    """torch intra-op threads for each of `actors` CPU actors sharing this node's cores."""
    return max(1, (os.cpu_count() or 1) // max(actors, 1))


# --------------------------------------------------------------------------------------------------
# The worker (a plain class: Ray actor, Ray Data UDF or in-process)


def _dtype(d: str | torch.dtype) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    out = getattr(torch, str(d), None)
    if not isinstance(out, torch.dtype):
        raise StridelabError(f"unknown dtype {d!r}; use float32, float16 or bfloat16")
    return out


def _seed_key(seeds: Sequence[int]) -> str:
    return hashlib.sha1(np.asarray(seeds, dtype=np.int64).tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class _ShardTeacher:
    timesteps: tuple[int, ...]  # the teacher's schedule
    x_T: torch.Tensor
    x0: torch.Tensor | None
    data: torch.Tensor | None


class SamplerWorker:
    """Loads a model once; each method samples or evaluates one shard of seeds.

    Every method is a pure function of its arguments (caches aside), so a retried call gives the same
    result. Runs as a Ray actor (`SamplerPool`), inside a Ray Data UDF (`SampleBatch`) or in-process.

    Args:
        model: model spec for `loader` (default `pipeline.models.load.load_model`).
        loader: ``(spec, device, dtype) -> LoadedModel``.
        device: default cuda when available, else cpu.
        dtype: model dtype name.
        forward_batch: rows per network call (fixed, for batch-size invariance; 0 = as given).
        threads: torch intra-op threads (None: leave as is).
        features: feature extractor spec for FID/KID (`pipeline.metrics.fid.make_feature_fn`), built on first use.
        cache_dir: where teachers are kept on disk (safetensors), or None.
        trace_dir: if set, every call leaves ``<pid>.<n>.<method>.start`` / ``.done`` marker files there
            (for debugging and fault-injection tests).
    """

    def __init__(
        self,
        model: str,
        *,
        loader: Loader | None = None,
        device: str | None = None,
        dtype: str = "float32",
        forward_batch: int = DEFAULT_FORWARD_BATCH,
        threads: int | None = None,
        features: str | None = None,
        cache_dir: str | None = None,
        trace_dir: str | None = None,
    ):
        if threads:
            torch.set_num_threads(int(threads))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = (loader or load_model)(model, self.device, _dtype(dtype))
        d = self.model.denoiser
        self.denoiser = BatchInvariant(d, forward_batch) if forward_batch > 0 else d
        self.forward_batch = int(forward_batch)
        self.features_spec = features
        self._feature_fn: Callable[[torch.Tensor], np.ndarray] | None = None
        self.cache_dir = cache_dir
        self.trace_dir = trace_dir
        self._calls = 0
        self._teachers: dict[tuple[str, int], _ShardTeacher] = {}
        self.teacher_builds = 0
        self._digest: str | None = None

    # -- bookkeeping -------------------------------------------------------------------------------
    def pid(self) -> int:
        return os.getpid()

    def stats(self) -> dict[str, int]:
        """{"pid", "teacher_builds", "cached_teachers"}: what this process has computed so far."""
        return {"pid": os.getpid(), "teacher_builds": self.teacher_builds, "cached_teachers": len(self._teachers)}

    def info(self) -> dict[str, Any]:
        m = self.model
        return {"alphas_cumprod": m.alphas_cumprod.cpu(), "sample_shape": m.sample_shape, "data_range": m.data_range,
                "has_data": callable(getattr(m.denoiser, "sample_data", None)), "device": str(self.device)}

    def _trace(self, method: str, stage: str) -> None:
        if self.trace_dir:
            Path(self.trace_dir, f"{os.getpid()}.{self._calls}.{method}.{stage}").touch()

    # -- sampling ----------------------------------------------------------------------------------
    def _x_T(self, seeds: Sequence[int]) -> tuple[torch.Tensor, list[torch.Generator]]:
        x_T, gens = initial_noise(seeds, self.model.sample_shape)  # drawn on the CPU, always
        return x_T.to(self.device), gens

    def _sample(self, x_T: torch.Tensor, gens: list[torch.Generator] | None, timesteps: Sequence[int], eta: float) -> torch.Tensor:
        return ddim_sample(self.denoiser, x_T, timesteps, self.model.alphas_cumprod, eta=eta,
                           generator=gens if eta > 0 else None)

    def sample(self, seeds: Sequence[int], timesteps: Sequence[int], eta: float = 0.0) -> torch.Tensor:
        """DDIM samples x_0 for `seeds` (model range), float32 CPU [len(seeds), *sample_shape]."""
        self._calls += 1
        self._trace("sample", "start")
        ts = validate_timesteps(list(timesteps), self.model.num_train_timesteps)
        if len(seeds) == 0:
            return torch.zeros(0, *self.model.sample_shape)
        x_T, gens = self._x_T(seeds)
        out = self._sample(x_T, gens, ts, eta).float().cpu()
        self._trace("sample", "done")
        return out

    # -- evaluation --------------------------------------------------------------------------------
    def _teacher_path(self, key: tuple[str, int]) -> Path | None:
        if not self.cache_dir:
            return None
        ident = json.dumps([self.model.spec, self._weights_digest(), key[0], key[1], self.device.type,
                            str(self.model.alphas_cumprod.dtype), self.forward_batch])
        return Path(self.cache_dir, f"teacher-{hashlib.sha1(ident.encode()).hexdigest()[:20]}.safetensors")

    def _weights_digest(self) -> str:
        """sha1 of the model's weights and abar table: a retrained checkpoint under the same spec (e.g. the
        bundled model after `stridelab train digits`) must not reuse teachers cached for the old weights."""
        if self._digest is None:
            h = hashlib.sha1(self.model.alphas_cumprod.double().cpu().numpy().tobytes())
            for name, t in sorted(self.model.denoiser.state_dict().items()):
                h.update(name.encode())
                h.update(t.detach().contiguous().cpu().numpy().tobytes())
            self._digest = h.hexdigest()[:16]
        return self._digest

    def teacher(self, seeds: Sequence[int], teacher_nfe: int | None = None, recon: bool = True, inversion: bool = False) -> _ShardTeacher:
        """The shard's x_T, teacher output (uniform DDIM with `teacher_nfe` steps, default all T) and data,
        computed on first use and kept (in memory; on disk when ``cache_dir`` is set)."""
        T = self.model.num_train_timesteps
        key = (_seed_key(seeds), T if teacher_nfe is None else int(teacher_nfe))
        have = self._teachers.get(key)
        need_data = inversion and callable(getattr(self.model.denoiser, "sample_data", None))
        if have is not None and (have.x0 is not None or not recon) and (have.data is not None or not need_data):
            return have
        x_T, _ = self._x_T(seeds)
        ts = uniform(key[1], self.model.alphas_cumprod).timesteps
        x0 = have.x0 if have is not None else None
        if recon and x0 is None:
            x0 = self._load_or_build_teacher(key, seeds, x_T, ts)
        data = have.data if have is not None else None
        if need_data and data is None:
            data = self.model.denoiser.sample_data(seeds).to(self.device)
        self._teachers[key] = _ShardTeacher(tuple(ts), x_T, x0, data)
        return self._teachers[key]

    def prepare(self, seeds: Sequence[int], teacher_nfe: int | None = None, recon: bool = True,
                inversion: bool = False) -> dict[str, int]:
        """Compute (or load) the shard's teacher now; returns `stats` (the teacher stays here)."""
        self.teacher(seeds, teacher_nfe, recon, inversion)
        return self.stats()

    def _load_or_build_teacher(self, key: tuple[str, int], seeds: Sequence[int], x_T: torch.Tensor,
                               ts: Sequence[int]) -> torch.Tensor:
        path = self._teacher_path(key)
        if path is not None and path.is_file():
            from safetensors.torch import load_file

            return load_file(str(path), device=str(self.device))["x0"]
        x0 = self._sample(x_T, None, ts, 0.0)
        self.teacher_builds += 1
        if path is not None:
            from safetensors.torch import save_file

            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            save_file({"x0": x0.contiguous().cpu(), "seeds": torch.as_tensor(list(seeds), dtype=torch.int64)}, str(tmp))
            os.replace(tmp, path)
        return x0

    def _features(self, x0: torch.Tensor) -> np.ndarray:
        from pipeline.metrics.fid import features_in_chunks, make_feature_fn

        if self._feature_fn is None:
            if not self.features_spec:
                raise StridelabError("FID/KID need a feature extractor: pass features= to the pool")
            self._feature_fn = make_feature_fn(self.features_spec, self.device)
        return features_in_chunks(self._feature_fn, self.model.to_unit(x0), self.forward_batch)

    def evaluate(
        self,
        seeds: Sequence[int],
        timesteps: Sequence[int],
        teacher_nfe: int | None = None,
        *,
        recon: bool = True,
        inversion: bool = False,
        fid_shift: np.ndarray | None = None,
        fid: bool = False,
        kid: bool = False,
    ) -> dict[str, Any]:
        """Per-seed metrics of one schedule on this shard.

        Returns:
            {"recon": float64 [b] or None, "inversion": float64 [b] or None, "seconds": float,
             "fid_stats": `FeatureStats` of the shard (shifted by `fid_shift`) or None,
             "feats": float64 [b, D] (for KID) or None}.
        """
        self._calls += 1
        self._trace("evaluate", "start")
        ts = validate_timesteps(list(timesteps), self.model.num_train_timesteps)
        teach = self.teacher(seeds, teacher_nfe, recon=recon, inversion=inversion)
        t0 = time.perf_counter()
        out: dict[str, Any] = {"recon": None, "inversion": None, "fid_stats": None, "feats": None}
        if teach.x0 is not None and tuple(ts) == teach.timesteps:
            x0 = teach.x0  # the teacher's own schedule (its FID is the floor of the table): already sampled
        else:
            x0 = self._sample(teach.x_T, None, ts, 0.0)
        to_unit, abar = self.model.to_unit, self.model.alphas_cumprod
        if recon:
            out["recon"] = per_sample_mse(to_unit(x0), to_unit(teach.x0)).cpu()  # = metrics.recon_errors
        if inversion and teach.data is not None:
            out["inversion"] = inversion_errors(self.denoiser, teach.data, ts, abar, to_unit).cpu()
        if fid or kid:
            from pipeline.metrics.fid import FeatureStats

            f = self._features(x0)
            out["fid_stats"] = FeatureStats.of(f, fid_shift) if fid else None
            out["feats"] = f if kid else None
        out["seconds"] = time.perf_counter() - t0
        self._trace("evaluate", "done")
        return out


# --------------------------------------------------------------------------------------------------
# The pool


def shard_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous, non-empty [start, stop) ranges splitting range(n) into at most `parts` near-equal pieces."""
    parts = max(1, min(parts, n))
    edges = [round(i * n / parts) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


class _Done:
    """A finished local 'future', so in-process and Ray calls share one code path."""

    def __init__(self, value: Any):
        self.value = value


def _ray_get(refs: list[Any]) -> list[Any]:
    import ray
    from ray.exceptions import RayTaskError

    remote = [r for r in refs if not isinstance(r, _Done)]
    try:
        got = iter(ray.get(remote)) if remote else iter(())
    except RayTaskError as e:
        # Bad input raised inside an actor: re-raise the one-line error, not Ray's traceback wrapper.
        cause = getattr(e, "cause", None)
        if isinstance(cause, StridelabError):
            raise StridelabError(str(cause)) from None
        raise
    return [r.value if isinstance(r, _Done) else next(got) for r in refs]


class PendingEvaluation:
    """Results of `SamplerPool.submit`, still running; ``result()`` waits and assembles them."""

    def __init__(self, pool: "SamplerPool", schedules: list[Schedule], refs: list[list[Any]], extra: tuple[str, ...]):
        self._pool, self.schedules, self._refs, self._extra = pool, schedules, refs, extra
        self._result: list[ScheduleResult] | None = None

    def ready(self) -> bool:
        import ray

        flat = [r for row in self._refs for r in row if not isinstance(r, _Done)]
        return not flat or len(ray.wait(flat, num_returns=len(flat), timeout=0)[0]) == len(flat)

    def result(self) -> list[ScheduleResult]:
        if self._result is None:
            self._result = [self._pool._assemble(s, _ray_get(row), self._extra) for s, row in zip(self.schedules, self._refs)]
        return self._result


class SamplerPool:
    """A resident pool of `SamplerWorker` actors evaluating schedules on a fixed seed set.

    Same contract as `pipeline.evaluation.inprocess.InProcessEvaluator`: ``evaluate(schedules)`` returns one
    `ScheduleResult` per schedule, in order, computed on `seeds` against the teacher; per-seed recon and
    inversion errors are bit-identical to it (for models whose forward is batch-invariant, e.g. gmm:*)
    and, for any model, identical for any number of actors.

    The seeds are split into one contiguous shard per actor; each actor computes its shard's teacher
    once and keeps it. ``submit(schedules)`` returns at once (for asking the next Optuna batch while
    this one runs); ``evaluate`` is ``submit(...).result()``.

    Args:
        model: model spec, loaded once by each actor (``loader(model, device, dtype)``).
        seeds: the seed set; sample i starts from seed i under every schedule.
        teacher_nfe: teacher steps (uniform DDIM), default every training timestep.
        inversion: also compute the inversion round trip (when the model can draw data).
        actors: number of Ray actors; 0 runs one worker in this process (no Ray). Default: the
            cluster's GPUs, or its CPUs.
        recon: compute recon errors (needs the teacher); when False, ``recon`` is NaN.
        extra_metrics: any of ("fid", "kid"), reported in ``ScheduleResult.extra``.
        features: feature extractor spec for FID/KID (`pipeline.metrics.fid.make_feature_fn`).
        reference: a `pipeline.metrics.fid.Reference` for FID/KID.
        loader, device, dtype, forward_batch, cache_dir, trace_dir: passed to each `SamplerWorker`.
        max_restarts: restarts per actor (and retries per task) after a crash.
        ray_address: cluster address (default ``$RAY_ADDRESS``, else a local Ray).
        num_cpus: per-actor CPUs (default: a fraction that leaves room for other Ray work).
        num_gpus: per-actor GPUs, requested as given (see `actor_resources`; default: sized from the GPUs
            the cluster has now).
    """

    def __init__(
        self,
        model: str,
        seeds: Sequence[int],
        teacher_nfe: int | None = None,
        inversion: bool = False,
        *,
        actors: int | None = None,
        recon: bool = True,
        extra_metrics: Sequence[str] = (),
        features: str | None = None,
        reference: Any = None,
        loader: Loader | None = None,
        device: str | None = None,
        dtype: str = "float32",
        forward_batch: int = DEFAULT_FORWARD_BATCH,
        cache_dir: str | os.PathLike | None = None,
        trace_dir: str | os.PathLike | None = None,
        max_restarts: int = 3,
        ray_address: str | None = None,
        num_cpus: float | None = None,
        num_gpus: float | None = None,
    ):
        self.model_spec = model
        self.seeds = tuple(int(s) for s in seeds)
        if not self.seeds:
            raise StridelabError("the pool needs at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise StridelabError("seeds must be distinct")
        bad = [m for m in extra_metrics if m not in EXTRA_METRICS]
        if bad:
            raise StridelabError(f"unknown metric {bad[0]!r}; extra metrics are {', '.join(EXTRA_METRICS)}")
        if extra_metrics and (reference is None or not features):
            raise StridelabError("FID/KID need `features` and a `reference` (pipeline.metrics.fid)")
        if teacher_nfe is not None and int(teacher_nfe) < 1:
            raise StridelabError(f"teacher_nfe must be >= 1, got {teacher_nfe}")
        self.teacher_nfe = teacher_nfe
        self.inversion, self.recon = bool(inversion), bool(recon)
        self.extra_metrics = tuple(extra_metrics)
        self.reference = reference
        self._owns_ray = False
        worker_kwargs = dict(loader=loader, device=device, dtype=dtype, forward_batch=forward_batch, features=features,
                             cache_dir=str(cache_dir) if cache_dir else None,
                             trace_dir=str(trace_dir) if trace_dir else None)
        if actors is not None and (not isinstance(actors, int) or actors < 0):
            raise StridelabError(f"actors must be an integer >= 0, got {actors!r}")
        if actors == 0:
            self.local = True
            self._handles: list[Any] = [SamplerWorker(model, **worker_kwargs)]
        else:
            import ray

            self.local = False
            self._owns_ray = init_ray(ray_address)
            res = ray.cluster_resources()
            if actors is None:
                actors = int(res.get("GPU", 0)) or int(res.get("CPU", 1))
            if num_gpus is not None:
                opts = actor_resources(actors, gpus_per_actor=num_gpus)
            elif num_cpus is None:
                opts = actor_resources(actors, cpu_share=0.5)
            else:
                opts = {"num_cpus": float(num_cpus)}
            if "num_gpus" not in opts:
                worker_kwargs["threads"] = threads_per_actor(actors)
            cls = ray.remote(SamplerWorker).options(max_restarts=max_restarts, max_task_retries=max_restarts, **opts)
            self._handles = [cls.remote(model, **worker_kwargs) for _ in range(actors)]
        self.shards = shard_bounds(len(self.seeds), len(self._handles))
        # Start the teachers now, in parallel; evaluate() just finds them cached.
        self._warm = [self._call(i, "prepare", self._shard_seeds(i), teacher_nfe, self.recon, self.inversion)
                      for i in range(len(self.shards))] if self.recon or self.inversion else []

    @property
    def actors(self) -> int:
        return 0 if self.local else len(self._handles)

    def _shard_seeds(self, i: int) -> list[int]:
        a, b = self.shards[i]
        return list(self.seeds[a:b])

    def _call(self, i: int, method: str, *args: Any, **kwargs: Any) -> Any:
        h = self._handles[i]
        if self.local:
            return _Done(getattr(h, method)(*args, **kwargs))
        return getattr(h, method).remote(*args, **kwargs)

    # -- public API --------------------------------------------------------------------------------
    def submit(self, schedules: Sequence[Schedule]) -> PendingEvaluation:
        """Start evaluating `schedules` on every shard; returns at once (in-process: after the work)."""
        schedules = list(schedules)
        for s in schedules:
            if not isinstance(s, Schedule):
                raise StridelabError(f"evaluate takes Schedule objects, got {type(s).__name__}")
        fid_shift = None
        if "fid" in self.extra_metrics:
            fid_shift = np.asarray(self.reference.mu, dtype=np.float64)
        refs = [[self._call(i, "evaluate", self._shard_seeds(i), list(s.timesteps), self.teacher_nfe,
                            recon=self.recon, inversion=self.inversion, fid_shift=fid_shift,
                            fid="fid" in self.extra_metrics, kid="kid" in self.extra_metrics)
                 for i in range(len(self.shards))] for s in schedules]
        return PendingEvaluation(self, schedules, refs, self.extra_metrics)

    def evaluate(self, schedules: Sequence[Schedule]) -> list[ScheduleResult]:
        """One `ScheduleResult` per schedule, in order (the `InProcessEvaluator.evaluate` contract)."""
        return self.submit(schedules).result()

    def sample(self, seeds: Sequence[int], timesteps: Sequence[int], eta: float = 0.0) -> torch.Tensor:
        """x_0 for `seeds` (any seeds, not only the pool's), sharded over the actors, in seed order."""
        seeds = [int(s) for s in seeds]
        bounds = shard_bounds(len(seeds), len(self._handles))
        refs = [self._call(i, "sample", seeds[a:b], list(timesteps), float(eta)) for i, (a, b) in enumerate(bounds)]
        parts = _ray_get(refs)
        return torch.cat(parts) if parts else torch.zeros(0)

    def pids(self) -> list[int]:
        """The process id of each actor (this process for an in-process pool)."""
        return _ray_get([self._call(i, "pid") for i in range(len(self._handles))])

    def worker_stats(self) -> list[dict[str, int]]:
        return _ray_get([self._call(i, "stats") for i in range(len(self._handles))])

    def close(self) -> None:
        """Kill the actors (and shut Ray down if this pool started it)."""
        if not self.local:
            import ray

            for h in self._handles:
                ray.kill(h, no_restart=True)
            if self._owns_ray:
                ray.shutdown()
        self._handles = []

    def __enter__(self) -> "SamplerPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- assembly ----------------------------------------------------------------------------------
    def _assemble(self, schedule: Schedule, parts: list[dict[str, Any]], extra_names: tuple[str, ...]) -> ScheduleResult:
        n = len(self.seeds)
        if self.recon:
            rec = torch.cat([p["recon"] for p in parts])
        else:
            rec = torch.full((n,), float("nan"), dtype=torch.float64)
        inv = torch.cat([p["inversion"] for p in parts]) if parts[0]["inversion"] is not None else None
        extra = None
        if extra_names:
            from pipeline.metrics.fid import FeatureStats, frechet_distance, kid

            extra = {}
            if "fid" in extra_names:
                stats = FeatureStats.merge(p["fid_stats"] for p in parts)
                extra["fid"] = frechet_distance(stats, self.reference.mu, self.reference.sigma)
            if "kid" in extra_names:
                if self.reference.feats is None:
                    raise StridelabError(f"KID needs reference features; {self.reference.name} has none")
                extra["kid"] = kid(np.concatenate([p["feats"] for p in parts]), self.reference.feats)
        return ScheduleResult(schedule, rec, inv, max(p["seconds"] for p in parts), extra)


# --------------------------------------------------------------------------------------------------
# Large sample sets through Ray Data


def _is_image(shape: Sequence[int]) -> bool:
    return len(shape) == 3 and shape[0] in (1, 3)


def to_uint8(x01: torch.Tensor) -> np.ndarray:
    """[0, 1] (clipped) -> uint8, rounding to nearest."""
    return (x01.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def png_bytes(img_u8: np.ndarray) -> bytes:
    """PNG of one uint8 image [C, H, W] (C = 1 grey or 3 RGB)."""
    from PIL import Image

    arr = img_u8[0] if img_u8.shape[0] == 1 else img_u8.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


class SampleBatch:
    """Ray Data UDF: ``{"data": int64 [b]} -> {"seed", "sample" float32 [b, D], "image" PNG bytes}``.

    Loads the model once (a `SamplerWorker`); seed = ``seed_offset + data`` (the sample index).
    """

    def __init__(self, model: str, timesteps: Sequence[int], eta: float = 0.0, seed_offset: int = 0, **worker_kwargs: Any):
        self.worker = SamplerWorker(model, **worker_kwargs)
        self.timesteps = tuple(int(t) for t in timesteps)
        self.eta, self.seed_offset = float(eta), int(seed_offset)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seeds = np.asarray(batch["data"], dtype=np.int64) + self.seed_offset
        x0 = self.worker.sample(seeds.tolist(), self.timesteps, self.eta)
        out = {"seed": seeds, "sample": x0.reshape(len(seeds), -1).numpy().astype(np.float32)}
        if _is_image(self.worker.model.sample_shape):
            u8 = to_uint8(self.worker.model.to_unit(x0))
            out["image"] = np.array([png_bytes(im) for im in u8], dtype=object)
        return out


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
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of samples in seed order: Ray Data with an actor pool of `actors`, or in-process for 0.
    `num_gpus`: GPUs per actor, requested as given (see `actor_resources`)."""
    kwargs = dict(loader=loader, forward_batch=forward_batch, trace_dir=trace_dir)
    if actors == 0:
        fn = SampleBatch(model, timesteps, eta, seed, **kwargs)
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
    opts = actor_resources(actors, cpu_share=0.9, gpus_per_actor=num_gpus)
    if "num_gpus" not in opts:
        kwargs["threads"] = threads_per_actor(actors)
    try:
        ctx.execution_options.preserve_order = True  # batches come back in seed order
        ctx.enable_progress_bars = False  # ours is enough
        ctx.print_on_execution_start = False
        blocks = max(1, min(4 * actors, math.ceil(num_samples / batch_size)))
        ds = ray.data.from_numpy(np.array_split(np.arange(num_samples, dtype=np.int64), blocks))
        ds = ds.map_batches(
            SampleBatch,
            fn_constructor_args=(model, tuple(timesteps), eta, seed),
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
) -> Path:
    """Stream batches into ``DIR/samples.parquet`` (+ ``grid.png``, ``schedule.json``), atomically.

    Everything is written into a temporary directory beside DIR and renamed into place at the end; on
    any failure the temporary directory is removed and DIR is untouched.
    Columns: seed int64, schedule string, nfe int32, eta float64, sample fixed_size_list<float32>[D]
    (model range; shape and dtype in the schema metadata), and image (PNG, uint8 from [0, 1]) for images.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    from tqdm import tqdm

    target = Path(out_dir).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    D = int(np.prod(sample_shape))
    meta = {
        "model": model, "sample_shape": list(sample_shape), "dtype": "float32", "data_range": list(data_range),
        "schedule": schedule.to_dict(), "eta": eta, "num_samples": num_samples,
        "columns": {"sample": "x_0 in the model's data range, flattened; reshape to sample_shape",
                    "image": "PNG, uint8 = round(255 * clip((x_0 - lo) / (hi - lo), 0, 1))"},
    }
    fields = [pa.field("seed", pa.int64()), pa.field("schedule", pa.string()), pa.field("nfe", pa.int32()),
              pa.field("eta", pa.float64()), pa.field("sample", pa.list_(pa.float32(), D))]
    if _is_image(sample_shape):
        fields.append(pa.field("image", pa.binary()))
    schema = pa.schema(fields, metadata={"stridelab": json.dumps(meta)})
    grid: list[np.ndarray] = []
    grid_size = grid_size if _is_image(sample_shape) else 4096  # points for the scatter plot
    expected = int(first_seed)
    try:
        with pq.ParquetWriter(tmp / "samples.parquet", schema) as w, \
                tqdm(total=num_samples, unit="sample", desc="sampling", disable=not progress) as bar:
            for b in batches:
                seeds = np.asarray(b["seed"], dtype=np.int64)
                if len(seeds) == 0:
                    continue
                if not np.array_equal(seeds, np.arange(expected, expected + len(seeds))):
                    raise RuntimeError(f"samples arrived out of seed order near seed {int(seeds[0])}")
                expected = int(seeds[-1]) + 1
                x = np.asarray(b["sample"], dtype=np.float32).reshape(len(seeds), D)
                cols = [pa.array(seeds), pa.array([schedule.name] * len(seeds)),
                        pa.array(np.full(len(seeds), schedule.nfe, dtype=np.int32)),
                        pa.array(np.full(len(seeds), float(eta))),
                        pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), D)]
                if "image" in schema.names:
                    cols.append(pa.array(list(b["image"]), type=pa.binary()))
                w.write_table(pa.Table.from_arrays(cols, schema=schema))
                if sum(len(g) for g in grid) < grid_size:
                    grid.append(x[: grid_size - sum(len(g) for g in grid)])
                bar.update(len(seeds))
        got = expected - int(first_seed)
        if got != num_samples:
            raise RuntimeError(f"expected {num_samples} samples, wrote {got}")
        first = np.concatenate(grid) if grid else np.zeros((0, D), np.float32)
        if _is_image(sample_shape):
            lo, hi = data_range
            images01 = (torch.from_numpy(first).reshape(-1, *sample_shape) - lo) / (hi - lo)
            Image.fromarray(tile(images01[:64], cols=8, scale=4)).save(tmp / "grid.png")
        else:
            Image.fromarray(scatter_image(first)).save(tmp / "grid.png")
        schedule.save(tmp / "schedule.json")
        replace_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
