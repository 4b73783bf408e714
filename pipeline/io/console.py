"""What the library shows on stderr besides its own log lines: progress bars and third-party chatter.

One process-wide setting (`Console`), set once by whoever owns the terminal (the CLI, `configure`) and read
where bars are drawn (`progress`) and where Ray starts (`pipeline.distributed.cluster.init_ray`). Library
callers that never configure it get the defaults: bars on a terminal only, third-party output as those
libraries print it.

Bars go to stderr, so stdout stays the command's result; they are off when stderr is not a terminal (a
log file, a pipe, a test), which is tqdm's own rule for ``disable=None``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Console:
    """Args:
        progress: False = no bars; True = bars where stderr is a terminal.
        verbose: leave third-party output (Ray's forwarded worker logs and warnings, MLflow's info lines) on.
    """

    progress: bool = True
    verbose: bool = True


_current = Console()


def configure(**changes: Any) -> Console:
    """Replace fields of the process-wide `Console`; returns the new one."""
    global _current
    _current = replace(_current, **changes)
    return _current


def current() -> Console:
    return _current


def progress(total: int | None, desc: str, unit: str = "it", enabled: bool = True, **kw: Any) -> Any:
    """A tqdm bar on stderr with rate and ETA: ``with progress(n, "trials") as bar: bar.update(k)``.

    Disabled (a no-op bar with the same methods) when `enabled` is False, the `Console` says no bars, or
    stderr is not a terminal. `total` None: a counter without ETA.
    """
    from tqdm.auto import tqdm

    disable = None if (enabled and _current.progress) else True  # None: tqdm turns itself off on a non-TTY
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, leave=False, dynamic_ncols=True, **kw)
