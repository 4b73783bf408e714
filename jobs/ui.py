"""`stridelab ui`: the MLflow UI on the sweeps' tracking store, bound to 127.0.0.1 by default."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ui",
        help="open the MLflow UI on the sweep runs",
        description="Run `mlflow server` on the same backend store as `stridelab sweep` (default sqlite:///<cwd>/mlflow.db).",
    )
    p.add_argument("--tracking-uri", "--backend-store-uri", dest="tracking_uri", default=None,
                   help="backend store (default sqlite:///<cwd>/mlflow.db)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=5000, help="port (default %(default)s)")
    p.add_argument("--print-command", action="store_true", help="print the mlflow command instead of running it")
    p.set_defaults(func=run)


def command(tracking_uri: str, host: str, port: int) -> list[str]:
    """The `mlflow server` command line; artifacts are served from the store's own artifact locations."""
    import sys

    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
            "--host", host, "--port", str(port), "--workers", "1"]


def run(args: argparse.Namespace) -> int:
    import shlex

    from pipeline.errors import StridelabError
    from search.tracking import default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri()
    if uri.startswith(("http://", "https://")):
        raise StridelabError(f"{uri} is already a tracking server: open it in a browser")
    if not 0 < args.port < 65536:
        raise StridelabError(f"--port must be in 1..65535, got {args.port}")
    cmd = command(uri, args.host, args.port)
    if args.print_command:
        print(shlex.join(cmd))
        return 0
    print(f"MLflow UI at {landing_url(uri, args.host, args.port)} (Ctrl-C to stop)", flush=True)
    return serve(cmd)


def landing_url(tracking_uri: str, host: str, port: int) -> str:
    """Where a browser should open: the sweeps' runs in MLflow's model-training view.

    MLflow 3.x opens experiments in its GenAI view (traces) unless the page carries
    ``workflowType=machine_learning``; sweeps log runs, metrics and plots, so the runs table is what to show.
    Falls back to the experiment list when the store has no sweep experiment yet.
    """
    from search.tracking import DEFAULT_EXPERIMENT

    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    exp_id = None
    if tracking_uri.startswith("sqlite:///") and not os.path.exists(tracking_uri[len("sqlite:///"):]):
        return f"{base}/#/experiments?workflowType=machine_learning"  # a new store: nothing to look up (or create)
    try:
        from mlflow.tracking import MlflowClient

        exp = MlflowClient(tracking_uri).get_experiment_by_name(DEFAULT_EXPERIMENT)
        exp_id = exp.experiment_id if exp is not None else None
    except Exception:  # a store the client cannot read yet: the server reports it itself
        exp_id = None
    page = f"experiments/{exp_id}/runs" if exp_id is not None else "experiments"
    return f"{base}/#/{page}?workflowType=machine_learning"


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
GRACE_S = 5.0
"""How long the server's processes get between SIGTERM and SIGKILL."""


def serve(cmd: list[str]) -> int:
    """Run `cmd` under a keeper (`keep`) in a new process group, and stop that whole group however stridelab
    is stopped: SIGINT, SIGTERM or SIGHUP to this process alone -> `stop_group`; SIGKILL of this process -> the
    keeper gets SIGTERM from the kernel (PR_SET_PDEATHSIG, Linux) and stops the group itself.

    Returns 0 after Ctrl-C, 128+sig after TERM/HUP, else the server's own exit status.
    """
    import sys

    got = _trap(STOP_SIGNALS)
    keeper = subprocess.Popen([sys.executable, "-m", "jobs.ui", "--keep", *cmd], start_new_session=True,
                              preexec_fn=_die_with_parent(os.getpid()))
    try:
        while not got and keeper.poll() is None:
            time.sleep(0.2)
    finally:
        stop_group(keeper.pid, GRACE_S + 5.0)  # the keeper's own TERM-then-KILL comes first
        try:
            keeper.wait(5)
        except subprocess.TimeoutExpired:
            pass
    if not got:
        return keeper.returncode
    return 0 if got[0] == signal.SIGINT else 128 + got[0]


def keep(cmd: list[str]) -> int:
    """The group leader between stridelab and `mlflow server`: runs `cmd` in its own group and, when it gets
    SIGTERM/SIGINT/SIGHUP or the server exits, stops every other process of the group (`stop_group`).

    Needed because `mlflow server` on SIGTERM stops uvicorn but neither exits nor stops its huey job
    consumers (measured with mlflow 3.17: seven of them left, re-parented to init).
    """
    got = _trap(STOP_SIGNALS)
    try:
        _subreaper()
        proc = subprocess.Popen(cmd)
        while not got and proc.poll() is None:
            time.sleep(0.2)
    finally:
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        stop_group(os.getpgrp(), GRACE_S, reap=True)
    proc.poll()
    return proc.returncode if not got else 128 + got[0]


def stop_group(pgid: int, grace_s: float = GRACE_S, reap: bool = False) -> None:
    """SIGTERM to process group `pgid`, SIGKILL to what is left after `grace_s`; the calling process, when in
    the group, is spared (it must ignore SIGTERM); `reap`: reap any child of the caller meanwhile."""
    me = os.getpid()
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        members = _members(pgid, me)
        if not members:
            return
        for pid in members if sig == signal.SIGKILL else []:
            _kill(pid, sig)
        if sig == signal.SIGTERM:
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and _members(pgid, me):
            if reap:
                _reap()
            time.sleep(0.1)
        if not _members(pgid, me):
            return


def _trap(signals: tuple[int, ...]) -> list[int]:
    """Record the signals received instead of dying of them; returns the list they are appended to."""
    got: list[int] = []
    for s in signals:
        signal.signal(s, lambda signum, frame: got.append(signum))
    return got


def _prctl(option: int, arg: int) -> bool:
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False  # not Linux


def _die_with_parent(parent: int):
    """A `preexec_fn`: the child gets SIGTERM when `parent` dies, even by SIGKILL (PR_SET_PDEATHSIG, Linux)."""
    def arm() -> None:
        if _prctl(1, signal.SIGTERM) and os.getppid() != parent:  # 1 = PR_SET_PDEATHSIG
            os.kill(os.getpid(), signal.SIGTERM)  # the parent died before prctl took effect
    return arm


def _subreaper() -> None:
    """Orphans of the group re-parent to this process rather than init (PR_SET_CHILD_SUBREAPER), so it reaps them."""
    _prctl(36, 1)


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name: state, ppid, pgrp, session, ..."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _members(pgid: int, but: int) -> list[int]:
    """Live (not zombie) processes of group `pgid` other than `but`. Without /proc: the group as one, or none."""
    if not os.path.isdir("/proc"):
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except (ProcessLookupError, PermissionError):
            return []
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != but and (st := _stat(int(d))) and int(st[2]) == pgid and st[0] != "Z":
            out.append(int(d))
    return out


if __name__ == "__main__":  # the keeper: python -m jobs.ui --keep CMD...
    import sys

    if sys.argv[1:2] != ["--keep"]:
        raise SystemExit("usage: python -m jobs.ui --keep CMD...")
    sys.exit(keep(sys.argv[2:]))
