"""What keeps stderr checks deterministic next to a live Ray: the session's Ray (`ray_local`, conftest.py)
forwards nothing from its workers to this process's stderr, so a CLI test's stderr holds only what the CLI
wrote. Worker prints and a killed actor (the "(gcs_server) Socket closed" kind of line that once failed CI)
must leave the driver's file descriptor 2 empty."""

from __future__ import annotations

import sys
import time


def test_session_ray_forwards_no_worker_output_to_stderr(ray_local, capfd):
    ray = ray_local

    @ray.remote(num_cpus=0.1)
    def noisy() -> int:
        print("stridelab-quiet-check: worker stdout", flush=True)
        print("stridelab-quiet-check: worker stderr", file=sys.stderr, flush=True)
        return 1

    @ray.remote(num_cpus=0.1)
    class Noisy:
        def ping(self) -> int:
            print("stridelab-quiet-check: actor stderr", file=sys.stderr, flush=True)
            return 2

    capfd.readouterr()  # start from an empty capture
    assert ray.get(noisy.remote()) == 1
    a = Noisy.remote()
    assert ray.get(a.ping.remote()) == 2
    ray.kill(a)  # a killed actor: Ray's own processes log about it
    time.sleep(3)  # Ray's log monitor forwards within ~1 s when it forwards at all
    out, err = capfd.readouterr()
    assert "stridelab-quiet-check" not in out + err, (out, err)
    assert not [ln for ln in err.splitlines() if ln.strip()], err
