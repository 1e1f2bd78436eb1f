"""A run on shared storage: the reduced demo on a real S3 server (SeaweedFS) from a two-node Ray cluster.

What a real cluster needs and one machine hides: every output on storage all nodes see (here S3: the
test's own loopback SeaweedFS), nothing written to a local ``s3:`` directory, a rerun that finds every
stage complete on S3, the work spread over the nodes, and the same selection as one node on local disk.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from selectmoe import storage

REPO = Path(__file__).resolve().parents[1]
# The reduced demo up to the selection (+ the finetune of the selected rows: Ray Train on S3 storage),
# two train workers, two score replicas and two sweep actors so a two-node cluster gets work on each node.
SHARED_DEMO = [
    "stages=[ingest,convert,warmup,score,select,report]",
    "demo.n_clean=120",
    "demo.n_eval=8",
    "demo.pretrain_steps=30",
    "demo.target_pretrain_steps=10",
    "warmup.epochs=1",
    "warmup.probe_samples=16",
    "warmup.num_workers=2",
    "warmup.resources_per_worker={CPU: 2}",  # a whole two-CPU node each: the workers land on both nodes
    "score.num_replicas=2",
    "select.k_range=[3,4]",
    "select.num_replicas=2",
    "select.baselines=[]",
]


def _drive(nodes: int, out: str, cwd: Path, env: dict[str, str], extra: list[str] = ()) -> dict:
    report = cwd / f"report-{nodes}.json"
    cmd = [sys.executable, str(REPO / "tests" / "pipeline_driver.py"), "--nodes", str(nodes),
           "--out", out, "--report", str(report), *SHARED_DEMO, *extra]  # fmt: skip
    env = {**env, "PYTHONPATH": f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    # Its own process group: on a timeout the driver and the Ray nodes it started go together.
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=1500)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"the {nodes}-node pipeline driver timed out:\n{stdout[-3000:]}{stderr[-3000:]}")
    assert proc.returncode == 0, stdout[-5000:] + stderr[-5000:]
    return json.loads(report.read_text())


def _selected_ids(select_dir: str) -> list[str]:
    text = storage.read_text(storage.join(select_dir, "selected_data.jsonl"))
    return [json.loads(line)["id"] for line in text.splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_demo_on_s3_from_two_nodes_matches_one_node_on_local_disk(s3_server, tmp_path):
    env = {**os.environ, **s3_server["env"], "SELECTMOE_CACHE": str(tmp_path / "node-cache")}
    out = f"s3://{s3_server['bucket']()}/run"
    work = tmp_path / "cwd"
    work.mkdir()

    shared = _drive(2, out, work, env)
    planned = ["demo", "ingest", "convert", "warmup", "score", "select", "report"]
    assert shared["runs"][0] == dict.fromkeys(planned, "ran")
    assert shared["runs"][1] == dict.fromkeys(planned, "skipped")  # everything found complete on S3
    assert shared["node_ips"] == ["127.0.0.1"] and len(shared["cluster_nodes"]) == 2
    # Train workers, score replicas (Ray Data's actor pool: `MapWorker(MapBatches(RouterScorer))`) and sweep
    # actors: each kind on both nodes.
    for kind in ("RayTrainWorker", "MapWorker(MapBatches(RouterScorer))", "_SweepWorker"):
        nodes = {n for cls, ids in shared["actor_nodes"].items() if kind in cls for n in ids}
        assert len(nodes) == 2, (kind, shared["actor_nodes"])
    # Nothing of the run on local disk: no `s3:` directory, every output under the bucket.
    assert not list(work.rglob("s3:*")) and not (REPO / "s3:").exists()
    listing = storage.list_files(out, recursive=True)
    for stage_dir in ("demo_assets", "ingest", "converted", "warmup", "router_data", "selection", "report"):
        assert storage.join(out, stage_dir, "_manifest.json") in listing, stage_dir
    assert any("/ray_results/" in p and p.endswith("trainable.safetensors") for p in listing)
    assert "k sweep" in storage.read_text(storage.join(out, "report", "report.html"))

    # One node, outputs on local disk, from the same converted model and ingested pool (read from S3:
    # the demo's pre-training is not rerun): the same selection.
    local = tmp_path / "local-run"
    inputs = [f"{key}={out}/{sub}" for key, sub in (
        ("warmup.model_dir", "converted"), ("data.ingest_dir", "ingest"),
    )]  # fmt: skip
    alone = _drive(1, str(local), work, env, ["stages=[warmup,score,select]", "demo.enabled=false", *inputs])
    assert alone["runs"][0] == dict.fromkeys(["warmup", "score", "select"], "ran")
    assert not (local / "ingest").exists() and not (local / "converted").exists()
    shared_ids = _selected_ids(storage.join(out, "selection"))
    assert shared_ids and shared_ids == _selected_ids(str(local / "selection"))
