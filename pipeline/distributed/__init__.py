"""Ray: cluster set-up (`cluster`), sampler actors (`worker`: model loaded once, teacher per seed shard),
the actor pool (`pool`), Ray Data sampling to Parquet (`data`)."""

from __future__ import annotations

from pipeline.distributed.cluster import (
    DEFAULT_PLACEMENT_TIMEOUT, PlacementWatch, actor_resources, check_gpus_per_actor, check_placement_timeout,
    cpus_per_actor, init_ray, node_cpus, parse_actor_resources, threads_per_actor,
)
from pipeline.distributed.data import SampleBatch, generate_samples, write_sample_dir
from pipeline.distributed.pool import PendingEvaluation, SamplerPool, shard_bounds
from pipeline.distributed.worker import SamplerWorker

__all__ = [
    "DEFAULT_PLACEMENT_TIMEOUT", "PlacementWatch", "check_placement_timeout", "node_cpus", "parse_actor_resources",
    "PendingEvaluation", "SampleBatch", "SamplerPool", "SamplerWorker", "actor_resources", "check_gpus_per_actor",
    "cpus_per_actor",
    "generate_samples", "init_ray", "shard_bounds", "threads_per_actor", "write_sample_dir",
]
