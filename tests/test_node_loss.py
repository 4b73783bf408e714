"""A worker node lost in the middle of a sweep, on a real two-node Ray cluster on this machine.

The cluster is this test's own: a head (`ray start --head`, 1 CPU, its own free ports and short temp dir,
token auth) and a worker node (`ray start --address HEAD --resources '{"stridelab_node_loss": 8}'`), each
started in its own session. The sweep asks for that custom resource per actor (``--actor-resources``), so its
actors run on the worker node only. Mid-sweep the worker node is SIGKILLed whole (every process of its
process group and tree: `ray start`, its raylet, agents and the actors). No node can host the actors any
more, so the sweep must stop by itself within ``--placement-timeout``: one error line naming the flag and
the resume command, exit 2, the study intact. A new worker node comes up and ``--resume`` finishes the
study with the same trials and numbers as an undisturbed sweep.

Every wait is bounded (subprocess timeouts, deadlines): a regression fails instead of hanging. Teardown kills
only the processes this test started (by process group, by descendants, by temp dir), never `ray stop`.
"""

from __future__ import annotations

import csv
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest

from ports import free_ports
from search.study import finished_count, make_storage

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"
RESOURCE = "stridelab_node_loss"
TRIALS = 24
PLACEMENT_TIMEOUT = 10

pytestmark = pytest.mark.slow  # ~3-4 min on 2 busy cores: two clusters' nodes, three sweeps



def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int(p.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(p.name))
    return kids


def _tree(pid: int) -> list[int]:
    """`pid` and every process below it."""
    kids, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _pids_mentioning(needle: str) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and int(p.name) != os.getpid() and needle in _cmdline(int(p.name))]


class Node:
    """One `ray start --block` of this test, in its own session (its own process group)."""

    def __init__(self, cmd: list[str], env: dict, log: Path, temp_dir: str):
        self.temp_dir, self.log = temp_dir, log
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)

    def pids(self) -> list[int]:
        return _tree(self.proc.pid) if self.proc.poll() is None else []

    def kill(self) -> None:
        """SIGKILL the whole node: its process group and its process tree, collected again until none is left
        (a worker started while the first ones die)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pids = set(_tree(self.proc.pid)) if self.proc.poll() is None else set()
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait(timeout=10)
            alive = [p for p in pids if Path(f"/proc/{p}").exists() and "(Z)" not in _stat(p)]
            if not alive:
                return
            time.sleep(0.2)
        raise AssertionError(f"processes of the killed node still alive: {alive}")


def _stat(pid: int) -> str:
    try:
        s = Path(f"/proc/{pid}/stat").read_text()
        return "(Z)" if s.rsplit(")", 1)[1].split()[0] == "Z" else s
    except OSError:
        return "(Z)"


class Cluster:
    """A head and worker nodes on 127.0.0.1, each with its own ports and temp dir."""

    def __init__(self, tmp: Path):
        self.tmp, self.nodes, self.workers = tmp, [], 0
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(32), "PYTHONPATH": str(ROOT),
                    "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.env.pop("RAY_ADDRESS", None)
        (self.gcs,) = free_ports(1)
        self.address = f"127.0.0.1:{self.gcs}"
        self.head = self._start(["--head", f"--port={self.gcs}", "--include-dashboard=false", "--num-cpus=1"], "head")
        self.wait_nodes(1)

    def _start(self, args: list[str], name: str) -> Node:
        temp_dir = tempfile.mkdtemp(prefix="nl", dir="/tmp")  # short: Ray's socket paths must stay < 107 bytes
        agent_http, agent_grpc, renv, metrics, node_mgr, obj_mgr = free_ports(6)
        cmd = [str(RAY), "start", "--block", "--node-ip-address=127.0.0.1", *args,
               f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--runtime-env-agent-port={renv}", f"--metrics-export-port={metrics}",
               f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}", f"--temp-dir={temp_dir}"]
        node = Node(cmd, self.env, self.tmp / f"{name}.log", temp_dir)
        self.nodes.append(node)
        return node

    def add_worker(self, cpus: int = 1) -> Node:
        self.workers += 1
        return self._start([f"--address={self.address}", f"--num-cpus={cpus}", f'--resources={{"{RESOURCE}": 8}}'],
                           f"worker{self.workers}")

    def alive_nodes(self) -> list[dict]:
        code = ("import json, ray; ray.init(address='%s', logging_level='error'); "
                "print(json.dumps([n['Resources'] for n in ray.nodes() if n['Alive']]))" % self.address)
        r = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            return []
        import json

        return json.loads(r.stdout.strip().splitlines()[-1])

    def wait_nodes(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.alive_nodes()) == n:
                return
            for node in self.nodes:
                if node.proc.poll() is not None and node.proc.returncode != -signal.SIGKILL:
                    pytest.fail(f"ray start exited {node.proc.returncode}:\n{node.log.read_text()[-3000:]}")
            time.sleep(1)
        pytest.fail(f"the cluster did not reach {n} live nodes in {timeout:.0f} s")

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.kill()
        for node in self.nodes:  # anything left that names a temp dir of ours
            for pid in _pids_mentioning(node.temp_dir):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            shutil.rmtree(node.temp_dir, ignore_errors=True)


def sweep_cmd(tmp: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", "sweep", "--model", "gmm:ring8", "--nfe", "5", "--trials", str(TRIALS),
            "--parallel", "2", "--num-seeds", "16", "--holdout-seeds", "8", "--teacher-nfe", "50",
            "--schedules", "uniform,quadratic", "--storage", str(tmp / "optuna.journal"),
            "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--study-name", "s", "--out-dir", str(tmp / "out"),
            "--no-holdout-fid", "--no-progress", *extra]


def study_of(tmp: Path) -> optuna.Study:
    return optuna.load_study(study_name="s", storage=make_storage(tmp / "optuna.journal"))


def counted(study: optuna.Study) -> list:
    return [t for t in study.trials if not t.user_attrs.get("stale")]


def read_rows(tmp: Path) -> list[dict]:
    with open(tmp / "out" / "s" / "comparison.csv", newline="") as f:
        return list(csv.DictReader(f))


def cluster_flags(c: Cluster) -> list[str]:
    return ["--ray-address", c.address, "--actors", "2", "--actor-resources", f'{{"{RESOURCE}": 1}}',
            "--placement-timeout", str(PLACEMENT_TIMEOUT)]


def actor_pids(node: Node) -> list[int]:
    return [p for p in node.pids() if "SamplerWorker" in _cmdline(p)]


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory) -> Path:
    """The undisturbed sweep, in this process (the pool's results equal in-process ones, bit for bit)."""
    clean = tmp_path_factory.mktemp("clean")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
    r = subprocess.run(sweep_cmd(clean, "--actors", "0"), cwd=clean, env=env, capture_output=True, text=True,
                       timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return clean


def sweep_and_kill(cluster: Cluster, tmp: Path, workers: list[Node], *extra: str) -> dict:
    """Run the sweep on `cluster`; once >= 4 trials finished and a batch is on the actors, SIGKILL the worker
    node holding the most actors. Returns the exit code, the log, timings and where the actors were."""
    log = (tmp / "first.log").open("w")
    proc = subprocess.Popen(sweep_cmd(tmp, *cluster_flags(cluster), *extra), cwd=tmp, env=cluster.env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    out: dict = {"on_workers": []}
    try:
        journal, deadline = tmp / "optuna.journal", time.monotonic() + 400
        while proc.poll() is None and time.monotonic() < deadline:
            on = [actor_pids(w) for w in workers]
            trials = []
            if journal.exists():
                try:
                    trials = study_of(tmp).get_trials(deepcopy=False)
                except KeyError:  # study not created yet
                    pass
            # Kill inside a batch: some trials finished, at least one asked and still on the actors.
            if any(on) and sum(t.state.is_finished() for t in trials) >= 4 and \
                    any(t.state == optuna.trial.TrialState.RUNNING for t in trials):
                out.update(on_workers=on, head_actors=actor_pids(cluster.head))
                victim = max(range(len(workers)), key=lambda i: len(on[i]))
                workers[victim].kill()
                out.update(victim=victim, killed_at=time.monotonic())
                break
            time.sleep(0.05)
        assert "killed_at" in out, "the sweep ended (or hung) before the worker node was killed:\n" + \
            (tmp / "first.log").read_text()[-3000:]
        # It must end by itself (bounded here: a hang fails the test).
        out["rc"] = proc.wait(timeout=PLACEMENT_TIMEOUT + 300)
        out["ended_after"] = time.monotonic() - out["killed_at"]
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
    out["log"] = (tmp / "first.log").read_text()
    return out


@pytest.fixture(scope="module")
def lost_and_resumed(tmp_path_factory, clean_run):
    """The sweep on the cluster with its one worker node killed, then resumed on a new worker node."""
    clean, tmp = clean_run, tmp_path_factory.mktemp("lost")
    cluster = Cluster(tmp)
    try:
        worker = cluster.add_worker()
        cluster.wait_nodes(2)
        k = sweep_and_kill(cluster, tmp, [worker])
        rc, first, stopped_after = k["rc"], k["log"], k["ended_after"]
        on_worker, head_actors = k["on_workers"][0], k["head_actors"]
        before = [t for t in study_of(tmp).trials if t.state.is_finished()]
        running = [t.number for t in study_of(tmp).trials if t.state == optuna.trial.TrialState.RUNNING]

        cluster.add_worker()
        cluster.wait_nodes(2)
        resumed = subprocess.run(sweep_cmd(tmp, *cluster_flags(cluster), "--resume"), cwd=tmp, env=cluster.env,
                                 capture_output=True, text=True, timeout=400)
    finally:
        cluster.stop()
    return dict(clean=clean, tmp=tmp, rc=rc, first=first, before=before, on_worker=on_worker,
                head_actors=head_actors, stopped_after=stopped_after, resumed=resumed,
                running=running)


def test_lost_node_stops_the_sweep_in_one_line_with_the_study_intact(lost_and_resumed):
    k = lost_and_resumed
    assert k["on_worker"] and k["head_actors"] == []  # the actors ran on the worker node only
    assert k["rc"] == 2, k["first"][-3000:]
    # (Ray's own processes forward "(raylet) ..." lines about the retries; the sweep's error is one line)
    errors = [ln for ln in k["first"].splitlines() if ln.startswith("stridelab")]
    assert len(errors) == 1, k["first"][-3000:]
    (line,) = errors
    assert line.startswith("stridelab sweep: error: no live Ray node can host the sampler actors"), line
    assert f"--placement-timeout {PLACEMENT_TIMEOUT} s" in line and "continue with: stridelab sweep" in line
    assert "--resume" in line and "Traceback" not in k["first"]
    assert k["stopped_after"] < PLACEMENT_TIMEOUT + 120
    # Intact: what finished before the loss is there, nothing counted twice, the rest of the batch RUNNING.
    before = k["before"]
    assert 4 <= len(before) < TRIALS and k["running"]
    assert not [t for t in before if t.state == optuna.trial.TrialState.FAIL]  # no trial blamed for the loss
    print(f"stopped {k['stopped_after']:.0f} s after the node was killed, {len(before)} trials finished")


def test_resume_on_a_new_node_equals_the_undisturbed_sweep(lost_and_resumed):
    k = lost_and_resumed
    r = k["resumed"]
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "marked FAIL" in r.stdout  # the batch the lost node was running
    got, ref = study_of(k["tmp"]), study_of(k["clean"])
    assert finished_count(got) == finished_count(ref) == TRIALS == len(counted(got))
    assert [t.state for t in counted(got)] == [t.state for t in counted(ref)]
    steps = lambda study: [t.user_attrs.get("timesteps") for t in counted(study)]  # noqa: E731
    assert steps(got) == steps(ref)
    assert [t.values for t in counted(got)] == [t.values for t in counted(ref)]
    for t in k["before"]:  # kept as they were
        assert (got.trials[t.number].state, got.trials[t.number].values) == (t.state, t.values)
    assert read_rows(k["tmp"]) == read_rows(k["clean"])


@pytest.fixture(scope="module")
def lost_with_a_spare(tmp_path_factory):
    """The sweep on a cluster with two worker nodes; the one holding the most actors is killed mid-batch. Each
    worker node has 4 (logical) CPUs, room for all 4 actors, so the survivor can host the restarted ones."""
    tmp = tmp_path_factory.mktemp("spare")
    cluster = Cluster(tmp)
    try:
        workers = [cluster.add_worker(cpus=4), cluster.add_worker(cpus=4)]
        cluster.wait_nodes(3)
        k = sweep_and_kill(cluster, tmp, workers)
        k["survivor_actors"] = actor_pids(workers[1 - k["victim"]])
    finally:
        cluster.stop()
    return dict(k, tmp=tmp)


def test_lost_node_with_a_spare_the_sweep_finishes_as_if_undisturbed(lost_with_a_spare, clean_run):
    k = lost_with_a_spare
    assert k["rc"] == 0, k["log"][-3000:]
    assert k["head_actors"] == [] and k["on_workers"][k["victim"]]
    got, ref = study_of(k["tmp"]), study_of(clean_run)
    # Exactly the requested trials, none failed or stale: the calls on the lost node were submitted again.
    assert len(got.trials) == finished_count(got) == TRIALS
    assert [t.state for t in got.trials] == [t.state for t in ref.trials]
    assert [t.user_attrs.get("timesteps") for t in got.trials] == [t.user_attrs.get("timesteps") for t in ref.trials]
    assert [t.values for t in got.trials] == [t.values for t in ref.trials]
    assert read_rows(k["tmp"]) == read_rows(clean_run)
    print(f"finished {k['ended_after']:.0f} s after the node was killed")
