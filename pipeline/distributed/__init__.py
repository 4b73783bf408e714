"""Ray: cluster set-up, sampler actors (model loaded once, teacher per seed shard), the actor pool, Ray Data sampling."""

from __future__ import annotations

from pipeline.distributed.pool import (
    SamplerPool,
    SamplerWorker,
    actor_resources,
    generate_samples,
    init_ray,
    shard_bounds,
    write_sample_dir,
)

__all__ = [
    "SamplerPool", "SamplerWorker", "actor_resources", "generate_samples", "init_ray", "shard_bounds", "write_sample_dir",
]
