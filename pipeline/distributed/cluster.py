"""Ray set-up and actor sizing: the one place Ray is started and the one CPU-share formula.

Resources are set where actors are launched: one GPU each when the cluster has GPUs, otherwise a
fraction of a CPU (on 2 cores whole-CPU actors starve Ray Data's read tasks and the pipeline hangs).
"""

from __future__ import annotations

import math
import os

from pipeline.errors import StridelabError


def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to Ray: `address` or ``$RAY_ADDRESS`` when given, else start a local instance.

    Does nothing when Ray is already initialised. Returns True when this call started or connected
    (the caller then owns the shutdown).

    Unless `pipeline.io.console` is verbose, Ray stays quiet on the driver's stderr: workers' logs are not
    forwarded (their exceptions still reach the driver through ``ray.get``) and only Ray's errors are logged
    (its start-up warnings, e.g. about token authentication, are not).
    """
    import logging

    import ray

    from pipeline.io import console

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return False
    verbose = console.current().verbose
    level = "warning" if verbose else "error"
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                 log_to_driver=verbose, logging_level=level)
    else:
        ray.init(address=address, log_to_driver=verbose, logging_level=level)
    if not verbose:  # Ray Data sets its own logger up on import (INFO): quiet it too
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    return True



def cpus_per_actor(cpus: float, actors: int, share: float = 1.0) -> float:
    """CPUs for each of `actors` actors splitting ``share * cpus``: rounded down to 1/100, in [0.01, 1]."""
    return max(0.01, math.floor(100 * min(1.0, share * cpus / actors)) / 100)


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
    return {"num_cpus": cpus_per_actor(cpus, actors, cpu_share)}


def threads_per_actor(actors: int) -> int:
    """torch intra-op threads for each of `actors` CPU actors sharing this node's cores."""
    return max(1, (os.cpu_count() or 1) // max(actors, 1))
