"""Static checks of cluster_configs/: launcher YAMLs against Ray's schema, GPU placement, no public 8265,
KubeRay manifests that run an existing entrypoint with an existing preset. No cloud, no cluster, < 5 s."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster_configs"
LAUNCHER = {"aws": CLUSTER / "aws-gpu.yaml", "gcp": CLUSTER / "gcp-gpu.yaml"}
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"
EVAL_DATA_KEYS = ("evaluate.mmlu_data", "evaluate.bbh_data", "evaluate.tydiqa_data")
PRESETS = {p.stem for p in (ROOT / "selectmoe" / "configs").glob("*.yaml")}
WORLD = {"0.0.0.0/0", "::/0"}


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _walk(node, path=()):
    """Every (path, scalar) leaf of a YAML document."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, (*path, str(k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, (*path, str(i)))
    else:
        yield path, node


def _commented_commands(text: str, prefix: str) -> list[list[str]]:
    """Shell commands quoted in comments (e.g. the firewall setup), joined across `\\` continuations."""
    body = "\n".join(
        line.lstrip("# ").rstrip() for line in text.splitlines() if line.lstrip().startswith("#")
    )
    body = body.replace("\\\n", " ")
    return [shlex.split(line.split("$(", 1)[-1].rstrip(")")) for line in body.splitlines() if prefix in line]


# ---------------------------------------------------------------- cluster launcher


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    ray_dir = Path(importlib.util.find_spec("ray").origin).parent  # no `import ray`: keeps this fast
    return json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text())


@pytest.mark.parametrize("cloud", sorted(LAUNCHER))
def test_launcher_yaml_matches_ray_schema(cloud, ray_schema):
    cfg = _load(LAUNCHER[cloud])
    jsonschema.validate(cfg, ray_schema)
    assert cfg["provider"]["type"] == cloud
    assert cfg["head_node_type"] in cfg["available_node_types"]


@pytest.mark.parametrize("cloud", sorted(LAUNCHER))
def test_head_is_cpu_only_and_workers_have_gpus(cloud):
    cfg = _load(LAUNCHER[cloud])
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert "guestAccelerators" not in head["node_config"]
    assert any("--num-cpus=0" in c for c in cfg["head_start_ray_commands"]), "no tasks on the head"
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert workers
    total_max = 0
    for name, node in workers.items():
        assert node["resources"].get("GPU", 0) >= 1, name
        assert 0 <= node.get("min_workers", 0) <= node["max_workers"], name
        total_max += node["max_workers"]
        if cloud == "gcp":
            (acc,) = node["node_config"]["guestAccelerators"]
            assert acc["acceleratorCount"] == node["resources"]["GPU"], name
            assert node["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE", name
    assert cfg["max_workers"] <= total_max


@pytest.mark.parametrize("cloud", sorted(LAUNCHER))
def test_project_is_mounted_and_installed(cloud):
    cfg = _load(LAUNCHER[cloud])
    (target,) = [t for t, src in cfg["file_mounts"].items() if src == "."]
    assert any(f"pip install -q -e {target}" in c for c in cfg["setup_commands"])
    assert {".git", ".venv", "outputs"} <= set(cfg["rsync_exclude"])


@pytest.mark.parametrize("cloud", sorted(LAUNCHER))
def test_dashboard_port_is_not_public(cloud):
    text = LAUNCHER[cloud].read_text()
    cfg = yaml.safe_load(text)
    for path, value in _walk(cfg):
        assert str(value) not in WORLD, f"world-open range at {'.'.join(path)}"
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    for rule in cfg["provider"].get("security_group", {}).get("IpPermissions", []):
        ranges = {r["CidrIp"] for r in rule.get("IpRanges", [])}
        assert not ranges & WORLD, rule
    if cloud == "aws":
        # Without explicit SecurityGroupIds Ray creates a group with SSH from 0.0.0.0/0.
        for name, node in cfg["available_node_types"].items():
            assert node["node_config"].get("SecurityGroupIds"), name
        cmds = _commented_commands(text, "authorize-security-group-ingress")
        assert cmds
        for cmd in cmds:
            port = cmd[cmd.index("--port") + 1] if "--port" in cmd else "all"
            assert "--cidr" not in cmd or port == "22", cmd
            assert "--source-group" in cmd or "--cidr" in cmd, cmd
    else:
        # The default VPC allows SSH from anywhere: every node sits in the dedicated subnet.
        for name, node in cfg["available_node_types"].items():
            (nic,) = node["node_config"]["networkInterfaces"]
            assert "/subnetworks/selectmoe-ray" in nic["subnetwork"], name
            assert "selectmoe-ray" in node["node_config"]["tags"]["items"], name
        cmds = _commented_commands(text, "firewall-rules create")
        assert cmds
        for cmd in cmds:
            opts = dict(a.split("=", 1) for a in cmd if a.startswith("--") and "=" in a)
            assert not set(opts["--source-ranges"].split(",")) & WORLD, cmd
            if not opts["--source-ranges"].startswith("10."):
                assert opts["--allow"] == "tcp:22", cmd


# ---------------------------------------------------------------- KubeRay


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB], ids=lambda p: p.name)
def test_kuberay_manifest_shape(path):
    doc = _load(path)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob"}[path.name]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    spec = _cluster_spec(doc)

    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head["rayStartParams"].get("num-cpus") == "0"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "8265 must not be exposed"
    (head_c,) = head["template"]["spec"]["containers"]
    assert head_c["image"].startswith("rayproject/ray:2.60.0-py311")
    assert {"requests", "limits"} <= set(head_c["resources"])
    for section in head_c["resources"].values():
        assert "nvidia.com/gpu" not in section

    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (worker_c,) = group["template"]["spec"]["containers"]
        assert worker_c["image"] == head_c["image"]
        assert int(worker_c["resources"]["limits"]["nvidia.com/gpu"]) >= 1


def test_rayjob_runs_the_pipeline_entrypoint_with_a_shipped_preset():
    doc = _load(RAYJOB)
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["submissionMode"] == "K8sJobMode"
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/pipeline.py"]
    assert (ROOT / argv[1]).is_file()
    preset = argv[argv.index("--config") + 1]
    assert preset in PRESETS, f"{preset} not in {sorted(PRESETS)}"
    overrides = dict(a.split("=", 1) for a in argv[argv.index("--config") + 2 :])
    for key in ("output_dir", "warmup.storage_path", "finetune.storage_path"):
        assert re.match(r"(s3|gs)://", overrides[key]), key
    # olmoe_less marks these mandatory (???), and its evaluations read local data: the job must set them.
    for key in ("convert.source", "data.pool", "finetune.base_model", *EVAL_DATA_KEYS):
        assert key in overrides, key
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert env["working_dir"]
    assert {".git", ".venv", "outputs"} <= set(env["excludes"])
