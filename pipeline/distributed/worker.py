"""The sampler worker: loads a model once; samples or evaluates one shard of seeds.

A plain class, so it runs as a Ray actor (`pipeline.distributed.pool.SamplerPool`), inside a Ray Data UDF
(`pipeline.distributed.data.SampleBatch`) or in-process. Each worker keeps the teacher of every seed shard
it has seen (in memory, optionally on disk as safetensors), so a sweep pays for a shard's teacher once.

Results do not depend on how the seeds were sharded: randomness is per sample (`pipeline.core.seeds`),
and the network always runs on batches of exactly ``forward_batch`` rows (`BatchInvariant` pads the
last one), so each row's output is independent of its neighbours. Every method is a pure function of
its arguments (caches aside), so Ray re-running a task on a restarted actor gives the same answer.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.batching import DEFAULT_FORWARD_BATCH, BatchInvariant
from pipeline.core.schedules import validate_timesteps
from pipeline.core.seeds import initial_noise
from pipeline.errors import StridelabError
from pipeline.evaluation.distances import make_distance
from pipeline.evaluation.gradient import round_trip_loss_and_grad, shard_loss_and_grad
from pipeline.evaluation.inprocess import evaluate_shard
from pipeline.io.files import atomic_write_bytes
from pipeline.metrics.teacher import run_teacher, teacher_timesteps
from pipeline.models.load import LoadedModel, load_model, model_dtype
from pipeline.solvers.registry import DEFAULT_SOLVER, solve

Loader = Callable[[str, Any, Any], LoadedModel]


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
        dtype: the network's dtype (`pipeline.models.load.DTYPES`).
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
        self.model = (loader or load_model)(model, self.device, model_dtype(dtype))
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

    def _trace(self, method: str, stage: str) -> None:
        if self.trace_dir:
            Path(self.trace_dir, f"{os.getpid()}.{self._calls}.{method}.{stage}").touch()

    # -- sampling ----------------------------------------------------------------------------------
    def _x_T(self, seeds: Sequence[int]) -> tuple[torch.Tensor, list[torch.Generator]]:
        x_T, gens = initial_noise(seeds, self.model.sample_shape)  # drawn on the CPU, always
        return x_T.to(self.device), gens

    def _sample(self, x_T: torch.Tensor, gens: list[torch.Generator] | None, timesteps: Sequence[int], eta: float,
                solver: str) -> torch.Tensor:
        return solve(solver, self.denoiser, x_T, timesteps, self.model.alphas_cumprod, eta=eta,
                     generator=gens if eta > 0 else None)

    def sample(self, seeds: Sequence[int], timesteps: Sequence[int], eta: float = 0.0,
               solver: str = DEFAULT_SOLVER) -> torch.Tensor:
        """Samples x_0 of `solver` for `seeds` (model range), float32 CPU [len(seeds), *sample_shape]."""
        self._calls += 1
        self._trace("sample", "start")
        ts = validate_timesteps(list(timesteps), self.model.num_train_timesteps)
        if len(seeds) == 0:
            return torch.zeros(0, *self.model.sample_shape)
        x_T, gens = self._x_T(seeds)
        out = self._sample(x_T, gens, ts, eta, solver).float().cpu()
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
        ts = teacher_timesteps(self.model.alphas_cumprod, key[1])
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
        x0 = run_teacher(self.denoiser, x_T, ts, self.model.alphas_cumprod)
        self.teacher_builds += 1
        if path is not None:
            from safetensors.torch import save

            # Atomic: an actor killed mid-write (or a second actor on the same shard) never leaves half a file.
            atomic_write_bytes(path, save({"x0": x0.contiguous().cpu(),
                                           "seeds": torch.as_tensor(list(seeds), dtype=torch.int64)}))
        return x0

    def gradient(self, seeds: Sequence[int], theta: torch.Tensor, teacher_nfe: int | None = None,
                 delta: torch.Tensor | None = None, dtype: str = "float32",
                 solver: str = "ddim", loss: str = "mse",
                 time_shift: bool = False,
                 rows: Sequence[int] | None = None) -> tuple[float, torch.Tensor, torch.Tensor | None]:
        """(sum over the shard's seeds of the continuous student's loss, its gradient in theta, in delta) against
        the shard's resident teacher (`pipeline.evaluation.gradient.shard_loss_and_grad`; the student is
        `solver`'s differentiable twin, run in `dtype`; `loss` names the distance,
        `pipeline.evaluation.distances`). `rows`: a mini-batch, indices into `seeds` (the teacher stays the whole
        shard's: it is computed once); `delta` then has one row per index.
        The raw denoiser is differentiated (no micro-batching: autograd needs one graph)."""
        self._calls += 1
        self._trace("gradient", "start")
        teach = self.teacher(seeds, teacher_nfe)
        if dtype not in ("float32", "float64"):  # the student's arithmetic, not the network's (`model_dtype`)
            raise StridelabError(f"`dtype` of the gradient must be float32 or float64, got {dtype!r}")
        dt = getattr(torch, dtype)
        x_T, x0 = teach.x_T, teach.x0
        if rows is not None:
            idx = torch.as_tensor(list(rows), dtype=torch.int64, device=x_T.device)
            x_T, x0 = x_T[idx], x0[idx]
        out = shard_loss_and_grad(self.model.denoiser, x_T.to(dt), x0.to(dt), theta,
                                  self.model.alphas_cumprod, delta=delta, solver=solver,
                                  distance=make_distance(loss, self.model.data_range), time_shift=time_shift)
        self._trace("gradient", "done")
        return out

    def round_trip_gradient(self, seeds: Sequence[int], shifts: torch.Tensor, encode_timesteps: Sequence[int],
                            decode_timesteps: Sequence[int], dtype: str = "float32",
                            rows: Sequence[int] | None = None) -> tuple[float, torch.Tensor, None]:
        """(sum over the shard's images of the DDIM round trip's error, its gradient in the model time shifts
        [n_e + n_d], None) (`pipeline.evaluation.gradient.round_trip_loss_and_grad`); the images are the shard's
        data (``sample_data`` of its seeds, kept like the teacher). `rows`: a mini-batch, indices into `seeds`."""
        self._calls += 1
        self._trace("round_trip_gradient", "start")
        if dtype not in ("float32", "float64"):
            raise StridelabError(f"`dtype` of the gradient must be float32 or float64, got {dtype!r}")
        data = self.teacher(seeds, None, recon=False, inversion=True).data
        if data is None:
            raise StridelabError(f"{self.model.spec} cannot draw data images (sample_data): no round trip to learn from")
        if rows is not None:
            data = data[torch.as_tensor(list(rows), dtype=torch.int64, device=data.device)]
        lo, hi = self.model.data_range
        out = round_trip_loss_and_grad(self.model.denoiser, data.to(getattr(torch, dtype)), encode_timesteps,
                                       decode_timesteps, shifts, self.model.alphas_cumprod, scale=1.0 / (hi - lo))
        self._trace("round_trip_gradient", "done")
        return out

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
        fid: bool = False,
        kid: bool = False,
        solver: str = DEFAULT_SOLVER,
        encode_timesteps: Sequence[int] | None = None,
        model_shift: Sequence[float] | None = None,
        encode_shift: Sequence[float] | None = None,
    ) -> dict[str, Any]:
        """Per-seed metrics of one schedule run by `solver` on this shard (the inversion round trip encodes
        along `encode_timesteps` where the schedule has an encoder of its own, else along `timesteps` reversed;
        `model_shift`: the schedule's per-step model time shift, `Schedule.model_shift`; `encode_shift`: its
        encoder's, `Schedule.inverse_model_shift`).

        Returns:
            {"recon": float64 [b] or None, "inversion": float64 [b] or None, "seconds": float,
             "feats": float64 [b, D] for FID/KID, or None}. The driver computes FID's statistics from the
            rows of every shard at once, so its bits cannot depend on how the seeds were split.
        """
        self._calls += 1
        self._trace("evaluate", "start")
        ts = validate_timesteps(list(timesteps), self.model.num_train_timesteps)
        enc = (None if encode_timesteps is None else
               validate_timesteps(list(encode_timesteps), self.model.num_train_timesteps, increasing=True))
        teach = self.teacher(seeds, teacher_nfe, recon=recon, inversion=inversion)
        t0 = time.perf_counter()
        out: dict[str, Any] = {"recon": None, "inversion": None, "feats": None}
        m = evaluate_shard(self.denoiser, self.model.alphas_cumprod, self.model.to_unit, ts, teach.x_T,
                           teach.x0, teach.timesteps, teach.data if inversion else None, solver, enc,
                           None if model_shift is None else [float(v) for v in model_shift],
                           None if encode_shift is None else [float(v) for v in encode_shift])
        x0 = m.x0
        if recon:
            out["recon"] = m.recon.cpu()
        if m.inversion is not None:
            out["inversion"] = m.inversion.cpu()
        if fid or kid:
            out["feats"] = self._features(x0)
        out["seconds"] = time.perf_counter() - t0
        self._trace("evaluate", "done")
        return out

