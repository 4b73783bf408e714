"""Safe defaults:

- every server the project starts binds 127.0.0.1 unless told otherwise: `stridelab ui` (MLflow), the
  local Ray of `pipeline.distributed.init_ray` and every other ``ray.init`` (no dashboard), the cluster
  launcher's head (dashboard on 127.0.0.1); the KubeRay head's dashboard binds the pod network only and is
  not exposed outside the cluster;
- weights load only through safetensors: no pickle / ``torch.load`` in `pipeline/` and `search/` (AST scan;
  `jobs/` and `benchmarks/` may read their own caches with ``torch.load(weights_only=True)``), every
  ``from_pretrained`` of a network passes ``use_safetensors=True``, and a pickle next to safetensors
  weights is never opened;
- schedules and exports are JSON, and a pickle is refused as a schedule.

Not ours to set: Ray 2.60's core gRPC servers (GCS, raylet, workers) listen on every interface whatever
``ray.init`` is given (see `test_local_ray_starts_no_dashboard`); on a shared network rely on Ray's
token authentication and a firewall.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STRICT = ("pipeline", "search")  # no unpickling of any kind
LENIENT = ("jobs", "benchmarks")  # torch.load(weights_only=True) of the project's own caches allowed
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
CONFIG_ONLY = ("Scheduler", "Tokenizer", "Config", "Processor", "FeatureExtractor")


def py_files(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    if isinstance(node, ast.Call):
        return dotted(node.func) + "()"
    return "?"


def kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else "<expr>"
    return None


def parse(p: Path) -> ast.AST:
    return ast.parse(p.read_text(encoding="utf-8"), filename=str(p))


# --------------------------------------------------------------------------------------------------
# servers


def test_ui_binds_localhost_by_default(capsys, tmp_path):
    from jobs.cli import build_parser, main

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    assert sub.choices["ui"].parse_args([]).host == "127.0.0.1"
    assert main(["ui", "--print-command", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]) == 0
    out = capsys.readouterr().out
    assert "--host 127.0.0.1" in out and "0.0.0.0" not in out


def test_no_cli_flag_defaults_to_all_interfaces():
    """No argparse default anywhere is 0.0.0.0 / :: (a user may pass it; we never choose it)."""
    bad = []
    for p in py_files("jobs", "search", "pipeline", "benchmarks"):
        for c in calls(parse(p)):
            if dotted(c.func).endswith("add_argument") and kw(c, "default") in ("0.0.0.0", "::"):
                bad.append(f"{p.relative_to(ROOT)}:{c.lineno}")
    assert bad == []


def test_every_ray_init_disables_the_dashboard_or_binds_it_to_localhost():
    found = []
    for p in [*py_files("pipeline", "search", "jobs", "benchmarks"), ROOT / "tests" / "conftest.py"]:
        for c in calls(parse(p)):
            if dotted(c.func) != "ray.init":
                continue
            found.append(p)
            address = kw(c, "address")
            if address not in (None, "local"):
                continue  # connecting to a cluster someone else started: it owns its binds
            assert kw(c, "include_dashboard") is False or kw(c, "dashboard_host") in LOOPBACK, \
                f"{p.relative_to(ROOT)}:{c.lineno}: local ray.init without include_dashboard=False"
    assert any(p.parent == ROOT / "pipeline" / "distributed" for p in found), "the library's own ray.init was not seen"


def test_local_ray_starts_no_dashboard(tmp_path):
    """`init_ray()` for real (in a subprocess): no dashboard / job server, nothing on Ray's dashboard port."""
    script = """
import json, os
from pipeline.distributed import init_ray
import ray, psutil  # psutil: Ray's bundled copy
init_ray(num_cpus=1)
node = ray._private.worker.global_worker.node
me = psutil.Process()
pids = {p.pid: p.name() for p in [me, *me.children(recursive=True)]}
listen = [(pids[c.pid], c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
          if c.status == psutil.CONN_LISTEN and c.pid in pids]
print(json.dumps({"webui": node.address_info.get("webui_url"), "listen": listen, "names": sorted(set(pids.values()))}))
ray.shutdown()
"""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert not info["webui"]
    assert not [x for x in info["listen"] if x[2] == 8265], info["listen"]
    assert not [n for n in info["names"] if "dashboard.py" in n or n == "ray::Dashboard"], info["names"]


def test_cluster_launcher_head_binds_the_dashboard_to_localhost():
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    for cmd in cluster["head_start_ray_commands"]:
        if "ray start" in cmd:
            assert "--dashboard-host=127.0.0.1" in cmd and "0.0.0.0" not in cmd
    for cmd in cluster.get("worker_start_ray_commands", []):
        assert "0.0.0.0" not in cmd
    # Every `ray start --head` in the docs binds its dashboard to localhost too.
    text = (ROOT / "docs" / "CLUSTER.md").read_text()
    heads = [ln for ln in text.replace("\\\n", " ").splitlines() if "ray start --head" in ln]
    assert heads and all("--dashboard-host=127.0.0.1" in ln or "include-dashboard=false" in ln for ln in heads)


def test_kuberay_head_dashboard_stays_inside_the_cluster():
    """The RayJob's head binds its dashboard to the pod IP (the submitter pod must reach it): told otherwise,
    on purpose and commented; the head service is not exposed (no LoadBalancer / NodePort / Ingress)."""
    path = ROOT / "deploy" / "kuberay-rayjob.yaml"
    text = path.read_text()
    job = yaml.safe_load(text)
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    host = head.get("rayStartParams", {}).get("dashboard-host")
    if host not in (None, *LOOPBACK):
        line = next(ln for ln in text.splitlines() if "dashboard-host" in ln)
        before = text.splitlines()[text.splitlines().index(line) - 1]
        assert "#" in line or before.strip().startswith("#"), "a non-local bind must say why"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert "LoadBalancer" not in text and "NodePort" not in text and "kind: Ingress" not in text


# --------------------------------------------------------------------------------------------------
# weights: safetensors only


def test_no_unpickling_in_pipeline_and_search():
    bad = []
    for p in py_files(*STRICT):
        tree = parse(p)
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            bad += [f"{p.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names if n in PICKLE_MODULES]
        for c in calls(tree):
            f = dotted(c.func)
            if f in ("torch.load", "torch.jit.load", "pd.read_pickle", "pandas.read_pickle") or f.endswith(".read_pickle"):
                bad.append(f"{p.relative_to(ROOT)}:{c.lineno} calls {f}")
            if f.endswith("load") and kw(c, "allow_pickle") not in (None, False):
                bad.append(f"{p.relative_to(ROOT)}:{c.lineno} {f}(allow_pickle=...)")
    assert bad == []


def test_jobs_and_benchmarks_read_only_weights_only_caches():
    bad = []
    for p in py_files(*LENIENT):
        tree = parse(p)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                bad += [f"{p.relative_to(ROOT)}:{node.lineno}" for m in mods if m.split(".")[0] in PICKLE_MODULES]
        for c in calls(tree):
            if dotted(c.func) in ("torch.load", "torch.jit.load") and kw(c, "weights_only") is not True:
                bad.append(f"{p.relative_to(ROOT)}:{c.lineno} torch.load without weights_only=True")
    assert bad == []


def test_every_from_pretrained_of_a_network_is_safetensors_only():
    seen, bad = 0, []
    for p in py_files("pipeline", "search", "jobs", "benchmarks"):
        for c in calls(parse(p)):
            f = dotted(c.func)
            owner = f.rsplit(".", 1)[0]
            if f.endswith(".from_pretrained") or f.endswith("Pipeline.download"):
                if any(s in owner for s in CONFIG_ONLY):
                    continue  # configs and vocabularies: JSON / text, no weights
                seen += 1
                if kw(c, "use_safetensors") is not True:
                    bad.append(f"{p.relative_to(ROOT)}:{c.lineno} {f}")
            if f.endswith(".save_pretrained") and kw(c, "safe_serialization") is False:
                bad.append(f"{p.relative_to(ROOT)}:{c.lineno} {f}(safe_serialization=False)")
    assert seen >= 2 and bad == []


class _Trap:
    """Unpickling this touches a file: proof that a pickle was opened."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.fixture(scope="module")
def tiny_unet_dir(tmp_path_factory):
    from diffusers import DDPMScheduler
    from tiny import tiny_unet

    d = tmp_path_factory.mktemp("tiny")
    unet = tiny_unet()
    unet.save_pretrained(d / "unet", safe_serialization=True)
    DDPMScheduler().save_pretrained(d / "scheduler")
    return d


def test_a_pickle_beside_the_weights_is_never_opened(tiny_unet_dir, tmp_path):
    import pickle
    import shutil

    from pipeline.errors import StridelabError
    from pipeline.models.load import load_model

    d = tmp_path / "m"
    shutil.copytree(tiny_unet_dir, d)
    marker = tmp_path / "unpickled"
    (d / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(_Trap(str(marker))))
    m = load_model(str(d))  # loads the safetensors weights
    assert m.sample_shape == (1, 8, 8) and not marker.exists()
    (d / "unet" / "diffusion_pytorch_model.safetensors").unlink()  # only the pickle left: refused, unopened
    with pytest.raises(StridelabError, match="no pickle"):
        load_model(str(d))
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# schedules are JSON


def test_schedules_and_exports_are_json(tmp_path):
    from pipeline.models.load import load_model
    from pipeline.core.schedules import Schedule, make_schedule
    from search import export

    m = load_model("gmm:ring8")
    s = make_schedule("karras", 7, m.alphas_cumprod)
    obj = json.loads(s.save(tmp_path / "k.json").read_text())
    assert obj["timesteps"] == list(s.timesteps) and Schedule.load(tmp_path / "k.json") == s
    e = json.loads(export.write_export(tmp_path / "e.json", export.export_for_model(s, m, {}, {})).read_text())
    assert e["timesteps"] == list(s.timesteps) and len(e["sigmas"]) == 8


def test_a_pickled_schedule_is_refused_not_opened(tmp_path):
    import pickle

    from pipeline.errors import StridelabError
    from pipeline.core.schedules import Schedule

    marker = tmp_path / "unpickled"
    p = tmp_path / "s.json"
    p.write_bytes(pickle.dumps(_Trap(str(marker))))
    with pytest.raises(StridelabError):
        Schedule.load(p)
    assert not marker.exists()
