"""A pipeline driver for the shared-storage tests, run as its own process (its own Ray, its own nodes).

``python tests/pipeline_driver.py --nodes N --out OUTPUT_DIR --report JSON [overrides...]``: starts a Ray
cluster of N nodes on loopback (``ray.cluster_utils.Cluster``; 4 CPUs in all), runs the demo pipeline twice
(the second run must skip every stage) and writes to JSON the stage outcomes of both runs and, per actor
class, the node ids its actors ran on.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--report", required=True)
    args, overrides = parser.parse_known_args()

    import ray
    from ray.cluster_utils import Cluster

    from selectmoe.config import load_config
    from selectmoe.pipeline import run_pipeline
    from selectmoe.ray_utils import WORKER_ENV, loopback_node

    os.environ.update(WORKER_ENV)
    # 4 CPUs in all (logical: Ray schedules by them), 2 per node on two nodes: a score replica takes a
    # whole CPU and leaves whole CPUs for the read tasks on some node (1-CPU nodes fragment: replicas of
    # 0.45 CPU on each node leave no node a whole CPU for a read task, and scoring waits forever).
    cpus_per_node = 4 // args.nodes
    with loopback_node():
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": cpus_per_node,
                "node_ip_address": "127.0.0.1",
                "include_dashboard": False,
            },
        )
        for _ in range(args.nodes - 1):
            cluster.add_node(num_cpus=cpus_per_node, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, runtime_env={"env_vars": dict(WORKER_ENV)}, log_to_driver=False)
    try:
        cfg = load_config("demo", [f"output_dir={args.out}", *overrides])
        runs = []
        for _ in range(2):
            outcomes = run_pipeline(cfg, echo=lambda line: print(line, flush=True))
            runs.append({o.stage: o.status for o in outcomes})
        from ray._private import state  # the GCS actor table (dead actors too); no dashboard needed

        nodes: dict[str, set[str]] = collections.defaultdict(set)
        for actor in state.actors().values():
            nodes[actor["ActorClassName"]].add(actor["Address"]["NodeID"])
        report = {
            "runs": runs,
            "cluster_nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
            "node_ips": sorted({n["NodeManagerAddress"] for n in ray.nodes()}),
            "actor_nodes": {k: sorted(v) for k, v in nodes.items()},
        }
        with open(args.report, "w") as fh:
            json.dump(report, fh, indent=1)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
