"""Ray set-up and actor sizing: the one place Ray is started and the one CPU-share formula.

Resources are set where actors are launched: one GPU each when the cluster has GPUs, otherwise a
fraction of a CPU (on 2 cores whole-CPU actors starve Ray Data's read tasks and the pipeline hangs).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping

from pipeline.errors import PlacementTimeout, StridelabError

DEFAULT_PLACEMENT_TIMEOUT = 600.0
"""Seconds an actor pool waits while no live node can host its actors (long enough for an autoscaler to
start a node)."""


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


def parse_actor_resources(text: str | Mapping[str, float] | None) -> dict[str, float] | None:
    """The one check of a per-actor custom-resource request: a JSON object (or mapping) of Ray custom
    resource names to amounts > 0, e.g. ``{"sweep_node": 1}``; CPUs and GPUs have their own parameters."""
    if text is None:
        return None
    if isinstance(text, str):
        try:
            text = json.loads(text)
        except json.JSONDecodeError as e:
            raise StridelabError(f"must be a JSON object such as '{{\"sweep_node\": 1}}', got {text!r} ({e.msg})",
                                 param="actor_resources") from None
    if not isinstance(text, Mapping) or not text:
        raise StridelabError(f"must be a non-empty JSON object of resource names to amounts, got {text!r}",
                             param="actor_resources")
    out: dict[str, float] = {}
    for name, amount in text.items():
        if not isinstance(name, str) or not name or name in ("CPU", "GPU", "memory", "object_store_memory"):
            raise StridelabError(f"names custom resources only, got {name!r} (CPUs and GPUs are sized by the pool; "
                                 "`gpus_per_actor` requests GPUs)", param="actor_resources")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 < float(amount) < 1e9:
            raise StridelabError(f"amounts must be numbers > 0, got {name}: {amount!r}", param="actor_resources")
        out[name] = float(amount)
    return out


def check_placement_timeout(seconds: float | None) -> float:
    """`placement_timeout` in seconds, >= 0 (0: wait without limit; None: `DEFAULT_PLACEMENT_TIMEOUT`)."""
    if seconds is None:
        return DEFAULT_PLACEMENT_TIMEOUT
    if not (isinstance(seconds, (int, float)) and not isinstance(seconds, bool)) or not 0 <= float(seconds) < math.inf:
        raise StridelabError(f"must be a number of seconds >= 0 (0: no limit), got {seconds!r}",
                             param="placement_timeout")
    return float(seconds)


def _nodes_with(need: Mapping[str, float]) -> list[dict[str, float]]:
    """The total resources of each live node that has (in total) at least `need`."""
    import ray

    return [n["Resources"] for n in ray.nodes()
            if n.get("Alive") and all(n["Resources"].get(k, 0.0) >= v for k, v in need.items())]


def node_cpus(resources: Mapping[str, float] | None = None) -> float:
    """CPUs of the live nodes that hold every resource in `resources` (all live nodes when None)."""
    return float(sum(r.get("CPU", 0.0) for r in _nodes_with(resources or {})))


class PlacementWatch:
    """Bounds the wait for actors that no live node can host (a node lost, or none with the resources asked).

    ``check()`` is called while results are pending: when no live node's total resources fit one actor's
    request, a clock starts; when it has run `timeout` seconds, `PlacementTimeout` is raised. A node that
    fits stops the clock. Contention (nodes that fit but are busy) never raises: that wait ends by itself.

    Args:
        request: one actor's Ray options (``num_cpus``, ``num_gpus``, ``resources``).
        timeout: seconds; 0 waits without limit (default `DEFAULT_PLACEMENT_TIMEOUT`).
        poll: seconds between checks.
    """

    def __init__(self, request: Mapping[str, object], timeout: float | None = None, poll: float = 1.0):
        need = {"CPU": float(request.get("num_cpus") or 0.0), "GPU": float(request.get("num_gpus") or 0.0),
                **dict(request.get("resources") or {})}  # type: ignore[arg-type]
        self.need = {k: v for k, v in need.items() if v > 0}
        self.timeout, self.poll = check_placement_timeout(timeout), float(poll)
        self._since: float | None = None

    def fits(self) -> bool:
        """Whether some live node of the cluster has (in total) what one actor asks for."""
        return bool(_nodes_with(self.need))

    def backoff(self, seconds: float) -> None:
        """Sleep `seconds`, checking placement meanwhile (`PlacementTimeout` when no node has fitted for
        `timeout` seconds), and longer while no live node fits one actor."""
        end = time.monotonic() + seconds
        while True:
            self.check()
            if time.monotonic() >= end and self._since is None:
                return
            time.sleep(self.poll)

    def check(self) -> None:
        if self.timeout == 0 or self.fits():
            self._since = None
            return
        now = time.monotonic()
        self._since = self._since or now
        if now - self._since >= self.timeout:
            asked = ", ".join(f"{k} {v:g}" for k, v in self.need.items())
            raise PlacementTimeout(f"no live Ray node can host the sampler actors ({asked} each) after "
                                   f"`placement_timeout` {self.timeout:g} s: a node was lost or none has these "
                                   "resources; stopped (add such a node, then run again)")


def actor_resources(actors: int, *, reserve_cpus: float = 0.0, cpu_share: float = 1.0,
                    gpus_per_actor: float | None = None,
                    resources: Mapping[str, float] | None = None) -> dict:
    """Ray resources for each of `actors` sampler actors on the current cluster.

    `gpus_per_actor` given: exactly that many GPUs (and one CPU) per actor, whatever the cluster has now;
    on an autoscaling cluster this is the request that makes it start GPU nodes (sizing from the GPUs
    present would fall back to CPU actors on a cluster scaled to zero).

    One GPU (and one CPU) each when the cluster has at least `actors` GPUs (an equal share of them when it
    has fewer, so the pool never waits for GPUs that do not exist); otherwise ``cpu_share`` of the CPUs that are
    free now, less `reserve_cpus`, split evenly and rounded down to 1/100 (at most 1, at least 0.01).
    Sizing from the free CPUs means a second pool (or a Ray Data job) still fits beside the first,
    instead of waiting forever for CPUs the first one holds.

    `resources` (custom Ray resources, see `parse_actor_resources`) go into the request as given, so the
    actors land only on nodes started with them (``ray start --resources``); the CPU share is then sized
    from those nodes' CPUs.
    """
    extra = {"resources": dict(resources)} if resources else {}
    if gpus_per_actor is not None:
        check_gpus_per_actor(gpus_per_actor, actors)
        return {"num_gpus": float(gpus_per_actor), "num_cpus": 1.0, **extra}
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0))
    if gpus >= 1:
        return {"num_gpus": min(1.0, math.floor(100 * gpus / actors) / 100), "num_cpus": 1.0, **extra}
    if resources:  # free CPUs are not reported per node: a share of the matching nodes' CPUs
        free = node_cpus(resources)
    else:
        free = float(ray.available_resources().get("CPU", 0.0))
    cpus = max(free - reserve_cpus, 0.01)
    return {"num_cpus": cpus_per_actor(cpus, actors, cpu_share), **extra}


def threads_per_actor(actors: int) -> int:
    """torch intra-op threads for each of `actors` CPU actors sharing this node's cores."""
    return max(1, (os.cpu_count() or 1) // max(actors, 1))
