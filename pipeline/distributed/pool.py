"""Schedule evaluation on a resident pool of `SamplerWorker` Ray actors (or in this process).

``SamplerPool(...).evaluate(schedules) -> list[ScheduleResult]`` has exactly the contract of
`pipeline.evaluation.inprocess.InProcessEvaluator.evaluate`. The seeds are split into one contiguous shard
per actor (`shard_bounds`); each actor computes its shard's teacher once and keeps it; the driver
concatenates the per-seed results and the per-seed feature rows in seed order and computes FID/KID from
all rows at once, so results do not depend on the number of actors (bit for bit).

Fault tolerance: actors run with ``max_restarts`` / ``max_task_retries``; every worker method is a pure
function of its arguments (the teacher cache is rebuilt on demand), so a retried task gives the same answer.
When no live node can host the actors any more (their node lost and no other fits), every wait gives up
after ``placement_timeout`` seconds with `PlacementTimeout` instead of waiting for ever (`PlacementWatch`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from pipeline.core.schedules import Schedule
from pipeline.distributed.cluster import (PlacementWatch, actor_resources, init_ray, parse_actor_resources,
                                          threads_per_actor)
from pipeline.distributed.worker import DEFAULT_FORWARD_BATCH, Loader, SamplerWorker
from pipeline.errors import StridelabError
from pipeline.evaluation.inprocess import ScheduleResult
from pipeline.solvers.registry import DEFAULT_SOLVER, get_solver

EXTRA_METRICS: tuple[str, ...] = ("fid", "kid")


def shard_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous, non-empty [start, stop) ranges splitting range(n) into at most `parts` near-equal pieces."""
    parts = max(1, min(parts, n))
    edges = [round(i * n / parts) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


class _Done:
    """A finished local 'future', so in-process and Ray calls share one code path."""

    def __init__(self, value: Any):
        self.value = value


class _Remote:
    """A call on an actor, submitted again when Ray gives it up for the actor's sake (its node unreachable or
    its restarts spent): every worker method is a pure function of its arguments, so a resubmitted call gives
    the same answer."""

    def __init__(self, submit: Callable[[], Any]):
        self.submit, self.ref = submit, submit()


RESUBMITS = 6
"""Resubmissions of one call after actor errors (backoff 2, 4, 8, 16, 30, 30 s: past the ~10-30 s in which
Ray's GCS marks an unreachable node dead and restarts its actors elsewhere)."""


def _ray_get(calls: list[Any], watch: PlacementWatch | None = None) -> list[Any]:
    """The values of `calls` (`_Done` or `_Remote`) in order.

    With a `watch`: a wait that no live node can end raises `PlacementTimeout` (`PlacementWatch`), and a call
    Ray fails with an actor error (the node lost: retries spent before the node was declared dead) is
    submitted again, after a backoff, up to `RESUBMITS` times; Ray restarts the actor on a node that fits."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    remote = [c for c in calls if isinstance(c, _Remote)]
    values: dict[int, Any] = {}
    for attempt in range(RESUBMITS + 1):
        pending = [c.ref for c in remote if id(c) not in values] if watch is not None else []
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=watch.poll)
            if pending:
                watch.check()
        failed: list[_Remote] = []
        for c in remote:
            if id(c) in values:
                continue
            try:
                values[id(c)] = ray.get(c.ref)
            except RayTaskError as e:
                # Bad input raised inside an actor: re-raise the one-line error, not Ray's traceback wrapper.
                cause = getattr(e, "cause", None)
                if isinstance(cause, StridelabError):
                    raise StridelabError(str(cause)) from None
                raise
            except RayActorError:
                if watch is None or attempt == RESUBMITS:
                    raise
                failed.append(c)
        if not failed:
            break
        watch.backoff(min(30.0, 2.0 ** (attempt + 1)))  # PlacementTimeout here once no node can host the actors
        for c in failed:
            c.ref = c.submit()
    return [c.value if isinstance(c, _Done) else values[id(c)] for c in calls]


class PendingEvaluation:
    """Results of `SamplerPool.submit`, still running; ``result()`` waits and assembles them."""

    def __init__(self, pool: "SamplerPool", schedules: list[Schedule], refs: list[list[Any]], extra: tuple[str, ...]):
        self._pool, self.schedules, self._refs, self._extra = pool, schedules, refs, extra
        self._result: list[ScheduleResult] | None = None

    def result(self) -> list[ScheduleResult]:
        if self._result is None:
            self._result = [self._pool._assemble(s, self._pool._get(row), self._extra)
                            for s, row in zip(self.schedules, self._refs)]
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
        resources: per-actor custom Ray resources, e.g. ``{"sweep_node": 1}``: the actors go only to nodes
            started with them (`parse_actor_resources`).
        placement_timeout: seconds a wait goes on while no live node can host the actors (after a node is
            lost, or when none has `resources`) before `PlacementTimeout`; 0: no limit; default 600.
        solver: the solver every schedule is run by unless a call names another (`pipeline.solvers`).
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
        solver: str = DEFAULT_SOLVER,
        resources: dict[str, float] | None = None,
        placement_timeout: float | None = None,
    ):
        self.model_spec = model
        self.solver = get_solver(solver).name
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
        self._watch: PlacementWatch | None = None
        resources = parse_actor_resources(resources)
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
                opts = actor_resources(actors, gpus_per_actor=num_gpus, resources=resources)
            elif num_cpus is None:
                opts = actor_resources(actors, cpu_share=0.5, resources=resources)
            else:
                opts = {"num_cpus": float(num_cpus), **({"resources": resources} if resources else {})}
            self._watch = PlacementWatch(opts, placement_timeout)
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

    def wait_for_teachers(self) -> None:
        """Block until every shard's teacher is computed, with a progress bar that ticks per shard (in-process:
        already done in the constructor)."""
        from pipeline.io.console import progress

        remote = [r for r in self._warm if not isinstance(r, _Done)]
        if not remote:
            return
        import ray

        by_ref = {c.ref: c for c in remote}
        with progress(len(remote), f"teacher ({len(self.seeds)} seeds)", unit="shard") as bar:
            while by_ref:
                done, _ = ray.wait(list(by_ref), num_returns=1, timeout=self._watch.poll if self._watch else None)
                if not done and self._watch is not None:
                    self._watch.check()
                for ref in done:
                    self._get([by_ref.pop(ref)])  # a failure raises here (after resubmissions), as in evaluate()
                    bar.update(1)

    def _shard_seeds(self, i: int) -> list[int]:
        a, b = self.shards[i]
        return list(self.seeds[a:b])

    def _get(self, refs: list[Any]) -> list[Any]:
        return _ray_get(refs, self._watch)

    def _call(self, i: int, method: str, *args: Any, **kwargs: Any) -> Any:
        h = self._handles[i]
        if self.local:
            return _Done(getattr(h, method)(*args, **kwargs))
        return _Remote(lambda: getattr(h, method).remote(*args, **kwargs))

    # -- public API --------------------------------------------------------------------------------
    def submit(self, schedules: Sequence[Schedule], solver: str | None = None) -> PendingEvaluation:
        """Start evaluating `schedules` (run by `solver`, default the pool's) on every shard; returns at once
        (in-process: after the work)."""
        schedules = list(schedules)
        solver = get_solver(solver or self.solver).name
        for s in schedules:
            if not isinstance(s, Schedule):
                raise StridelabError(f"evaluate takes Schedule objects, got {type(s).__name__}")
        refs = [[self._call(i, "evaluate", self._shard_seeds(i), list(s.timesteps), self.teacher_nfe,
                            recon=self.recon, inversion=self.inversion,
                            fid="fid" in self.extra_metrics, kid="kid" in self.extra_metrics, solver=solver,
                            **_schedule_kwargs(s))
                 for i in range(len(self.shards))] for s in schedules]
        return PendingEvaluation(self, schedules, refs, self.extra_metrics)

    def evaluate(self, schedules: Sequence[Schedule], solver: str | None = None) -> list[ScheduleResult]:
        """One `ScheduleResult` per schedule, in order (the `InProcessEvaluator.evaluate` contract)."""
        return self.submit(schedules, solver).result()

    def sample(self, seeds: Sequence[int], timesteps: Sequence[int], eta: float = 0.0,
               solver: str | None = None) -> torch.Tensor:
        """x_0 of `solver` (default the pool's) for `seeds` (any seeds, not only the pool's), sharded over
        the actors, in seed order."""
        seeds = [int(s) for s in seeds]
        solver = get_solver(solver or self.solver).name
        bounds = shard_bounds(len(seeds), len(self._handles))
        refs = [self._call(i, "sample", seeds[a:b], list(timesteps), float(eta), solver)
                for i, (a, b) in enumerate(bounds)]
        parts = self._get(refs)
        return torch.cat(parts) if parts else torch.zeros(0)

    def gradient(self, theta: torch.Tensor, delta: torch.Tensor | None = None,
                 dtype: str = "float32", solver: str = "ddim", loss: str = "mse",
                 time_shift: bool = False, rows: torch.Tensor | None = None) -> tuple[float, torch.Tensor, torch.Tensor | None]:
        """Data-parallel `SamplerWorker.gradient` over the pool's seeds: each actor differentiates its shard
        (student: `solver`'s differentiable twin, distance `loss`, theta with the model time shift when
        `time_shift`) against its resident teacher; returns the
        sums over all seeds (a `GradFn`, see `search.placement.gradient`), delta's gradient in seed order.
        `delta`: [len(seeds), ...] or None. `rows`: a mini-batch, sorted indices into the pool's seeds (then the
        sums are over those seeds and `delta` has one row per index); each actor differentiates the rows of its
        shard against the shard's resident teacher, an actor with none is not called.
        ``submit_gradient(...)()`` is the same, started at once."""
        return self.submit_gradient(theta, delta, dtype, solver, loss, time_shift, rows)()

    def submit_gradient(self, theta: torch.Tensor, delta: torch.Tensor | None = None, dtype: str = "float32",
                        solver: str = "ddim", loss: str = "mse", time_shift: bool = False,
                        rows: torch.Tensor | None = None):
        """Start `gradient` on every actor and return at once a ``wait()`` giving its result, so several pools'
        actors (a sweep's screen and rest) differentiate at the same time."""
        theta = theta.detach().cpu()
        return self._submit_rows(lambda i, part, local: self._call(
            i, "gradient", self._shard_seeds(i), theta, self.teacher_nfe, part, dtype, solver, loss, time_shift, local),
            delta, rows)

    def submit_round_trip_gradient(self, shifts: torch.Tensor, encode_timesteps: Sequence[int],
                                   decode_timesteps: Sequence[int], dtype: str = "float32",
                                   rows: torch.Tensor | None = None):
        """Start `SamplerWorker.round_trip_gradient` (the round trip's error on each actor's images, and its
        gradient in the model time shifts) on every actor; returns a ``wait()`` like `submit_gradient`. The pool
        must have been built with ``inversion=True`` (the actors hold their shard's images)."""
        if not self.inversion:
            raise StridelabError("the round trip's gradient needs the pool's images: build it with inversion=True")
        shifts = shifts.detach().cpu()
        enc, dec = [int(v) for v in encode_timesteps], [int(v) for v in decode_timesteps]
        return self._submit_rows(lambda i, part, local: self._call(
            i, "round_trip_gradient", self._shard_seeds(i), shifts, enc, dec, dtype, local), None, rows)

    def _submit_rows(self, call, delta: torch.Tensor | None, rows: torch.Tensor | None):
        """``call(actor index, its rows of delta or None, its mini-batch rows or None)`` on every actor that holds
        some of `rows` (all of them without rows); a ``wait()`` summing the (loss, gradient, delta's gradient)."""
        refs = []
        for i, (a, b) in enumerate(self.shards):
            if rows is None:
                local, part = None, None if delta is None else delta[a:b]
            else:
                mine = (rows >= a) & (rows < b)
                if not bool(mine.any()):
                    continue
                local, part = (rows[mine] - a).tolist(), None if delta is None else delta[mine]
            refs.append(call(i, None if part is None else part.detach().cpu(), local))

        def wait() -> tuple[float, torch.Tensor, torch.Tensor | None]:
            parts = self._get(refs)
            total = sum(p[0] for p in parts)
            g_theta = torch.stack([p[1] for p in parts]).sum(0)
            g_delta = None if delta is None else torch.cat([p[2] for p in parts])
            return total, g_theta, g_delta

        return wait

    def pids(self) -> list[int]:
        """The process id of each actor (this process for an in-process pool)."""
        return self._get([self._call(i, "pid") for i in range(len(self._handles))])

    def worker_stats(self) -> list[dict[str, int]]:
        return self._get([self._call(i, "stats") for i in range(len(self._handles))])

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
            feats = np.concatenate([p["feats"] for p in parts])  # seed order, whatever the split
            if "fid" in extra_names:
                # One reduction over all rows on the driver: summing per-shard moments instead made the
                # 8th digit of FID depend on the number of actors.
                stats = FeatureStats.of(feats, np.asarray(self.reference.mu, dtype=np.float64))
                extra["fid"] = frechet_distance(stats, self.reference.mu, self.reference.sigma)
            if "kid" in extra_names:
                if self.reference.feats is None:
                    raise StridelabError(f"KID needs reference features; {self.reference.name} has none")
                extra["kid"] = kid(feats, self.reference.feats)
        return ScheduleResult(schedule, rec, inv, max(p["seconds"] for p in parts), extra)


def _schedule_kwargs(schedule: Schedule) -> dict[str, list]:
    """The worker's ``encode_timesteps`` for a schedule with an encoder of its own, ``model_shift`` and
    ``encode_shift`` for one with model time shifts (decoder, encoder); nothing for a plain schedule (so its call is the call it always was)."""
    out: dict[str, list] = {}
    if schedule.inverse_timesteps is not None:
        out["encode_timesteps"] = list(schedule.inverse_timesteps)
    if schedule.model_shift is not None:
        out["model_shift"] = list(schedule.model_shift)
    if schedule.inverse_model_shift is not None:
        out["encode_shift"] = list(schedule.inverse_model_shift)
    return out
