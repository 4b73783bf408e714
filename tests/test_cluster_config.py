"""cluster.yaml (Ray cluster launcher) and deploy/kuberay-rayjob.yaml (KubeRay RayJob): structure, Ray's
own cluster schema, and the `stridelab sweep` flags they and docs/CLUSTER.md use against the real CLI."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load((ROOT / "deploy" / "kuberay-rayjob.yaml").read_text())


def _sweep_flags() -> set[str]:
    from jobs.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return {s for a in sub.choices["sweep"]._actions for s in a.option_strings}


def _flags_of(command: str) -> list[str]:
    words = shlex.split(command, comments=True)
    i = words.index("sweep")
    return [w.split("=")[0] for w in words[i + 1:] if w.startswith("--")]


def test_cluster_yaml_validates_against_rays_schema(cluster):
    import jsonschema
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    # the pinned ray ships it; a ray without it cannot validate cluster.yaml, which is a failure, not a skip
    assert schema_path.is_file(), f"this ray has no {schema_path}"
    jsonschema.validate(cluster, json.loads(schema_path.read_text()))
    # And Ray's own loader: defaults filled in for the provider, then validated again (offline).
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cluster))


def test_cluster_yaml_structure(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    workers = {k: v for k, v in types.items() if k != cluster["head_node_type"]}
    assert head["resources"].get("GPU", 0) == 0
    gpu = [v for v in workers.values() if v["resources"].get("GPU", 0) >= 1]
    assert gpu, "no GPU worker node type"
    for w in gpu:
        assert 0 <= w["min_workers"] <= w["max_workers"] <= cluster["max_workers"]
        assert w["node_config"]["InstanceType"].startswith(("g", "p"))  # an AWS GPU family
    assert cluster["provider"]["type"] == "aws"
    # The repo is mounted and installed on every node, stridelab (and its pinned ray) from it.
    mounts = cluster["file_mounts"]
    assert "." in mounts.values()
    repo = next(k for k, v in mounts.items() if v == ".")
    setup = " && ".join(cluster["setup_commands"])
    assert re.search(r"pip install (-e )?\.", setup) and repo.replace("~/", "") in setup
    assert ".venv" in cluster["rsync_exclude"]
    # Safe binds: the dashboard/job server listens on localhost only (ray dashboard tunnels to it).
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--head" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start
    assert "$RAY_HEAD_IP:6379" in " ".join(cluster["worker_start_ray_commands"])


def test_rayjob_structure(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert shlex.split(spec["entrypoint"])[:2] == ["stridelab", "sweep"]
    assert '--storage "$OPTUNA_STORAGE"' in spec["entrypoint"]
    assert '--tracking-uri "$MLFLOW_TRACKING_URI"' in spec["entrypoint"]
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    head_env = {e["name"]: e for e in head["template"]["spec"]["containers"][0]["env"]}
    # The storage URL (with its password) comes from a Secret, never from this file.
    assert head_env["OPTUNA_STORAGE"]["valueFrom"]["secretKeyRef"]["name"]
    assert "value" not in head_env["OPTUNA_STORAGE"]
    assert head_env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow:5000"
    assert not re.search(r"postgresql://[^\s'\"]*:[^\s'\"@]+@", json.dumps(rayjob))  # no password anywhere
    (group,) = cluster["workerGroupSpecs"]
    assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    res = group["template"]["spec"]["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == 1 and res["requests"]["nvidia.com/gpu"] == 1


def test_sweep_flags_in_manifests_and_docs_exist(rayjob):
    """Every `stridelab sweep --flag` written in the manifest and in docs/CLUSTER.md is a real flag."""
    known = _sweep_flags()
    assert {"--storage", "--tracking-uri", "--ray-address", "--actors", "--study-name", "--resume"} <= known
    commands = [rayjob["spec"]["entrypoint"]]
    docs = (ROOT / "docs" / "CLUSTER.md").read_text()
    # Shell blocks, with backslash continuations joined.
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", docs, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if "stridelab sweep" in line:
                commands.append(line[line.index("stridelab sweep"):])
    assert len(commands) >= 3
    for cmd in commands:
        unknown = [f for f in _flags_of(cmd) if f not in known]
        assert not unknown, (cmd, unknown)
