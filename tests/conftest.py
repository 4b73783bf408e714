"""Shared fixtures. `ray_local`: one real local Ray for the whole test session (started on first use);
`cli_stderr`: what a CLI wrote to stderr, as lines, without lines Ray forwards from its own processes."""

from __future__ import annotations

import os
import re

import pytest

# Ray's log monitor prints other processes' log lines on the driver's stderr, asynchronously, prefixed
# "(pid=...)", "(raylet)", "(gcs_server)" or "(ActorName pid=...)", often in ANSI colour. One such line
# (a gcs_server "Socket closed" after an actor was killed by an earlier test) once landed inside a
# bad-input test's captured stderr and failed CI.
_RAY_FORWARDED = re.compile(r"^(\x1b\[[0-9;]*m)*\((pid=|raylet|gcs_server|autoscaler|monitor|[A-Za-z_][\w.]* pid=)")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray (2 CPUs, no dashboard), started once per session and shut down at the end."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    started = not ray.is_initialized()
    if started:
        # log_to_driver off: workers' logs would land, at random moments, inside other tests' captured stderr.
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning",
                 log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module: analytic models run on tiny tensors, where one thread is many
    times faster on a busy 2-core box. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def cli_stderr(capsys):
    """Call to read the stderr captured so far as stripped, non-empty lines, minus Ray-forwarded lines."""
    def read() -> list[str]:
        lines = [ln.strip() for ln in capsys.readouterr().err.splitlines()]
        return [ln for ln in lines if ln and not _RAY_FORWARDED.match(ln)]
    return read
