"""Evaluators for a sweep and the objective values read from their results.

An evaluator is anything with ``evaluate(schedules) -> list[ScheduleResult]`` on a fixed seed set (the
contract of `pipeline.evaluation.inprocess.InProcessEvaluator`). `EvaluatorFactory` makes one per seed set:
the Ray actor pool `pipeline.distributed.SamplerPool` (``actors=0`` runs its worker in this process),
or `InProcessEvaluator` where the pool is not importable. The model stays resident in the pool's
actors (or in this process) for the whole sweep: trials never load it.

Objectives (`Objective`):
    ``recon``      mean per-seed recon MSE vs the teacher ([0, 1] scale)
    ``fid``        ``ScheduleResult.extra["fid"]``
    ``recon+fid``  log(recon) + fid_weight * log(fid): a weighted sum that needs no unit conversion
    ``recon,fid``  two objectives (recon, fid); the study keeps a Pareto front
    ``inversion``  mean per-image DDIM round-trip MSE (encode real data along the schedule, decode along it;
                   `pipeline.metrics.recon.inversion_errors`): needs a model that draws data (``sample_data``)
    ``recon,inversion``  two objectives (recon, inversion); a Pareto front
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from pipeline.distributed import check_gpus_per_actor, check_placement_timeout, parse_actor_resources
from pipeline.errors import StridelabError
from pipeline.evaluation.inprocess import ScheduleResult
from pipeline.metrics.reference import fid_inputs
from pipeline.models.load import LoadedModel
from pipeline.core.schedules import Schedule
from pipeline.solvers.registry import DEFAULT_SOLVER, get_solver

OBJECTIVES = ("recon", "fid", "recon+fid", "recon,fid", "inversion", "recon,inversion")


_NO_INVERSION = "objective needs inversion errors but the evaluator returned none (made without inversion=True?)"


class Evaluator(Protocol):
    def evaluate(self, schedules: Sequence[Schedule], solver: str | None = None) -> list[ScheduleResult]: ...


class TrialFailed(Exception):
    """A schedule's metrics are unusable (NaN, missing): the trial is recorded FAIL, the sweep goes on."""


@dataclass(frozen=True)
class Objective:
    """What a trial minimises, read from a `ScheduleResult`."""

    name: str = "recon"
    fid_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVES:
            raise StridelabError(f"unknown objective {self.name!r}; choose one of {', '.join(OBJECTIVES)}")
        if not (math.isfinite(self.fid_weight) and self.fid_weight >= 0):
            raise StridelabError(f"fid weight must be a finite number >= 0, got {self.fid_weight}")

    @property
    def multi(self) -> bool:
        return "," in self.name

    @property
    def needs_fid(self) -> bool:
        return "fid" in self.name

    @property
    def needs_inversion(self) -> bool:
        """Whether evaluators must run the round trip (``inversion=True``: it doubles the model calls)."""
        return "inversion" in self.name

    @property
    def per_seed_metric(self) -> str:
        """The per-seed metric the pruning screen compares and the held-out verdict reads: ``inversion`` for the
        inversion objective, else ``recon``."""
        return "inversion" if self.name == "inversion" else "recon"

    def per_seed(self, result: ScheduleResult) -> torch.Tensor:
        """`per_seed_metric` of one result, per seed [B]; raises `TrialFailed` when it is missing."""
        errs = result.inversion if self.per_seed_metric == "inversion" else result.recon
        if errs is None:
            raise StridelabError(_NO_INVERSION)
        return errs

    @property
    def directions(self) -> list[str]:
        return ["minimize", "minimize"] if self.multi else ["minimize"]

    def metrics(self, result: ScheduleResult) -> dict[str, float]:
        """recon (and fid when present) as floats; raises `TrialFailed` on NaN or a missing FID."""
        m = {"recon": float(result.recon.double().mean())}
        extra = result.extra or {}
        if self.needs_fid:
            if "fid" not in extra:
                raise StridelabError("objective needs FID but the evaluator returned none (no feature extractor?)")
        if "fid" in extra:
            m["fid"] = float(extra["fid"])
        if self.needs_inversion and result.inversion is None:
            raise StridelabError(_NO_INVERSION)
        if result.inversion is not None:
            m["inversion"] = float(result.inversion.double().mean())
        bad = [k for k, v in m.items() if not math.isfinite(v)]
        if bad:
            raise TrialFailed(f"non-finite {', '.join(bad)}")
        return m

    def values(self, metrics: dict[str, float]) -> list[float]:
        if self.name != "recon+fid":  # one metric, or two for a Pareto front
            return [metrics[k] for k in self.name.split(",")]
        if metrics["recon"] <= 0 or metrics["fid"] <= 0:
            raise TrialFailed("recon+fid needs positive recon and fid (log scale)")
        return [math.log(metrics["recon"]) + self.fid_weight * math.log(metrics["fid"])]


class EvaluatorFactory:
    """Makes the evaluators of one sweep (one per seed set), all on the same model and teacher.

    Args:
        model: the loaded model (used in-process; the pool's actors load ``model.spec`` themselves).
        actors: Ray actors per pool; 0 = in this process.
        ray_address: an existing cluster (default: ``$RAY_ADDRESS``, else a local Ray).
        teacher_nfe: teacher steps (default every training timestep).
        fid: also compute FID (``extra["fid"]``).
        inversion: also compute the DDIM round trip on the model's data (``ScheduleResult.inversion``); only
            when the objective needs it (it doubles the model calls).
        gpus_per_actor: GPUs each actor requests, as given (an autoscaling cluster starts GPU nodes for
            them); default: one GPU per actor when the cluster has GPUs now, else CPU actors.
        solver: what runs every schedule (`pipeline.solvers`); an evaluator's ``evaluate(schedules, solver)``
            may name another for one call (the held-out table's reference rows).
        dtype: the network's dtype in the pool's actors (`pipeline.models.load.DTYPES`); in-process evaluators
            run `model` as loaded.
        actor_resources: custom Ray resources each actor requests (``{"sweep_node": 1}``): the actors go only
            to nodes started with them; their CPU share is sized from those nodes.
        placement_timeout: seconds a pool waits while no live node can host its actors (a node lost) before
            `PlacementTimeout` stops the sweep; 0: no limit.
        loader: how the pool's workers load ``model.spec`` (default `pipeline.models.load.load_model`); a sweep on
            the user's images passes `search.sweep.data.LoaderWithData` so the workers draw them too.
    """

    def __init__(self, model: LoadedModel, actors: int = 0, ray_address: str | None = None,
                 teacher_nfe: int | None = None, fid: bool = False, log: Callable[[str], None] = print,
                 gpus_per_actor: float | None = None, solver: str = DEFAULT_SOLVER, dtype: str = "float32",
                 inversion: bool = False, actor_resources: dict[str, float] | None = None,
                 placement_timeout: float | None = None,
                 loader: Callable[[str, Any, Any], LoadedModel] | None = None):
        self.dtype = dtype
        self.actor_resources = parse_actor_resources(actor_resources)
        self.placement_timeout = check_placement_timeout(placement_timeout)
        self.loader = loader
        self.model, self.actors, self.teacher_nfe, self.fid = model, int(actors), teacher_nfe, fid
        self.inversion = bool(inversion)
        self.solver = get_solver(solver).name
        self.gpus_per_actor = gpus_per_actor
        check_gpus_per_actor(gpus_per_actor, self.actors)
        self._made: list[Any] = []
        self._owns_ray = False
        self._fid_inputs = fid_inputs(model) if fid else None
        self.log = log
        try:
            from pipeline.distributed import SamplerPool, init_ray  # noqa: F401

            self._pool_cls = SamplerPool
        except ImportError:
            self._pool_cls = None
        if self.actors > 0:
            if self._pool_cls is None:
                log("the Ray actor pool (pipeline.distributed) is not available: evaluating in this process")
                self.actors = 0
            else:
                from pipeline.distributed import init_ray  # sets RAY_USAGE_STATS_ENABLED

                # Ray is started here, not by the first pool, so closing one pool never stops the others.
                self._owns_ray = init_ray(ray_address)
        self.kind = f"ray actor pool ({self.actors} actors per seed set)" if self.actors else "in-process"

    def __call__(self, seeds: Sequence[int], fid: bool | None = None) -> Evaluator:
        """An evaluator on `seeds`; `fid` (default: the factory's) adds ``extra["fid"]``."""
        seeds = [int(s) for s in seeds]
        fid = self.fid if fid is None else fid
        if fid and self._fid_inputs is None:
            self._fid_inputs = fid_inputs(self.model)
        if self._pool_cls is not None and (self.actors > 0 or fid):
            kw: dict[str, Any] = {}
            if fid:
                kw = dict(extra_metrics=("fid",), features=self._fid_inputs[0], reference=self._fid_inputs[1])
            if self.loader is not None:
                kw["loader"] = self.loader
            if self.actors > 0 and self.gpus_per_actor is not None:
                kw["num_gpus"] = self.gpus_per_actor
            elif self.actors > 0:
                kw["num_cpus"] = self._cpus_per_actor()
            if self.actors > 0:
                kw.update(resources=self.actor_resources, placement_timeout=self.placement_timeout)
            ev = self._pool_cls(self.model.spec, seeds, self.teacher_nfe, actors=self.actors, solver=self.solver,
                                 dtype=self.dtype, inversion=self.inversion, **kw)
        else:
            if fid:
                raise StridelabError("FID needs the evaluator of pipeline.distributed, which is not available")
            from pipeline.evaluation.inprocess import InProcessEvaluator

            ev = InProcessEvaluator(self.model, seeds, self.teacher_nfe, inversion=self.inversion, solver=self.solver)
        self._made.append(ev)
        return ev

    LIVE_POOLS = 2
    """Pools alive at once in a sweep (pruning screen + rest; the held-out pool comes after they close)."""

    def _cpus_per_actor(self) -> float | None:
        """A fixed CPU share per actor such that `LIVE_POOLS` pools always fit on the cluster (sizing from
        the CPUs free at creation time can leave a later pool waiting forever); None on GPU clusters."""
        import ray

        from pipeline.distributed import cpus_per_actor, node_cpus

        res = ray.cluster_resources()
        if res.get("GPU", 0) >= 1:
            return None
        # With custom resources the actors fit only on the nodes that have them: share those nodes' CPUs.
        cpus = node_cpus(self.actor_resources) if self.actor_resources else float(res.get("CPU", 1.0))
        return cpus_per_actor(cpus or 1.0, self.LIVE_POOLS * self.actors, 0.9)

    def release(self, ev: Any) -> None:
        """Close one evaluator (its actors and their CPUs go back to Ray)."""
        close = getattr(ev, "close", None)
        if close is not None:
            close()
        self._made = [e for e in self._made if e is not ev]

    def close(self) -> None:
        for ev in reversed(self._made):
            close = getattr(ev, "close", None)
            if close is not None:
                close()
        self._made = []
        if self._owns_ray:
            import ray

            ray.shutdown()
            self._owns_ray = False
