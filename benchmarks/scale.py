"""Select at scale: N-row pools and router data in the exact on-disk formats, then validate, ingest, select
and the router report, each timed, with the peak PSS of the whole process tree and the disk it wrote.

    python benchmarks/scale.py --rows 100000 1000000 [--work /tmp/scale-bench] [--k-range 10 100]
        [--n-init 3] [--replicas 2] [--select KEY=VALUE ...]
    python benchmarks/scale.py --rows 100000 --sweep-cost 10 55 100 --n-init 3   # one sweep task per k
    python benchmarks/scale.py --rows 40000 --compare-sample 10000 --k-range 10 30  # sampled vs exact

Each size runs in its own subprocess (so its memory figures are its own) and prints one JSON line; the
parent prints a table and the growth factor between consecutive sizes. The pool: JSONL written here
(4 datasets, short chat rows), validated and ingested by the project's own ``validate_main`` and
``ingest_pool``; router data: one shard per ingest shard written by ``RouterDataWriter`` in 256-row
batches (the score stage's granularity), rows shuffled within a shard (score writes by length), 16 layers
x 64 experts = 1,024 float16 routing features with cluster structure (30 clusters: per-layer softmax of a
centre's logits plus noise), prompt keys drawn from 4 x N values (``select.one_answer_per_prompt``). PSS and CPU seconds: ``/proc/<pid>/smaps_rollup`` and ``stat`` of this process and every descendant (the
in-process Ray's GCS, raylet and workers are descendants), sampled every 0.5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

LAYERS, EXPERTS = 16, 64
DATASETS = ("cot", "dolly", "flan_v2", "oasst1")
N_CLUSTERS = 30


# --- memory and disk ------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def _pss_and_cpu(pid: int) -> tuple[int, float]:
    pss = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
                break
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return pss, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree(root: int) -> dict[int, tuple[int, float]]:
    """``{pid: (Pss bytes, CPU seconds)}`` of ``root`` and all its descendants."""
    out, stack = {}, [root]
    while stack:
        pid = stack.pop()
        if pid in out:
            continue
        try:
            out[pid] = _pss_and_cpu(pid)
        except (OSError, IndexError, ValueError):
            continue
        stack += _children(pid)
    return out


class PeakPss:
    """Peak tree PSS and the tree's CPU seconds while the ``with`` block runs (a sampling thread, every
    ``every`` s; a process's CPU time counts up to its last sample). CPU seconds say what the stage costs
    on a quiet box when the wall time is inflated by other work on a shared one."""

    def __init__(self, every: float = 0.5):
        self.every, self.peak, self._stop = every, 0, threading.Event()
        self._cpu0: dict[int, float] = {}
        self._cpu: dict[int, float] = {}

    def _sample(self):
        t = tree(os.getpid())
        self.peak = max(self.peak, sum(p for p, _ in t.values()))
        first = not self._cpu  # processes already running at the start count from there, new ones from 0
        for pid, (_, cpu) in t.items():
            self._cpu0.setdefault(pid, cpu if first else 0.0)
            self._cpu[pid] = cpu

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every)

    @property
    def cpu_s(self) -> float:
        return sum(c - self._cpu0.get(pid, 0.0) for pid, c in self._cpu.items())

    def __enter__(self):
        self._sample()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self._sample()


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# --- data -----------------------------------------------------------------------------------------
def write_pool(path: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    ds = rng.integers(0, len(DATASETS), n)
    words = rng.integers(0, 1 << 30, (n, 2))
    with path.open("w") as f:
        for i in range(n):
            row = {
                "dataset": DATASETS[ds[i]],
                "messages": [
                    {"role": "user", "content": f"question {i} about {words[i, 0]:x}"},
                    {"role": "assistant", "content": f"answer {i}: {words[i, 1]:x}"},
                ],
            }
            f.write(json.dumps(row) + "\n")


def write_router_data(ingest_dir: Path, router_dir: Path, seed: int) -> None:
    import pyarrow.parquet as pq

    from selectmoe.data.ingest import list_shards
    from selectmoe.router_data import RouterDataWriter

    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=2.0, size=(N_CLUSTERS, LAYERS, EXPERTS)).astype(np.float32)
    # prompt keys drawn from 4 x N values: a fifth of the rows share their question with another (1 - e^-0.25),
    # and the rule leaves out 11% of the rows (all but each shared question's best)
    n_keys = 4 * sum(pq.read_metadata(s).num_rows for s in list_shards(ingest_dir))
    for shard in list_shards(ingest_dir):
        t = pq.read_table(shard, columns=["id", "dataset"])
        order = rng.permutation(t.num_rows)
        ids = np.asarray(t.column("id").to_pylist(), dtype=object)[order]
        datasets = np.asarray(t.column("dataset").to_pylist(), dtype=object)[order]
        w = RouterDataWriter(router_dir, shard.stem, LAYERS, EXPERTS)
        for s in range(0, len(ids), 256):
            b = len(ids[s : s + 256])
            lab = rng.integers(0, N_CLUSTERS, b)
            logits = centres[lab] + rng.normal(scale=0.7, size=(b, LAYERS, EXPERTS)).astype(np.float32)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            nll = rng.uniform(0.5, 3.0, b).astype(np.float32)
            w.write_batch(
                {
                    "id": ids[s : s + b].tolist(),
                    "dataset": datasets[s : s + b].tolist(),
                    "n_tokens": rng.integers(20, 500, b),
                    "truncated": np.zeros(b, bool),
                    "quality": rng.uniform(size=b),
                    "response_nll": nll,
                    "sample_nll": nll * 0.8,
                    "ifd": rng.uniform(0.5, 1.2, b),
                    "quality_layers": rng.uniform(size=(b, LAYERS)),
                    "routing": p.reshape(b, -1).astype(np.float16),
                    "prompt_key": rng.integers(0, n_keys, b),
                }
            )
        w.close()


def synthetic_routing(n: int, seed: int) -> np.ndarray:
    """float16 [n, 1,024] routing rows with the router-data generator's cluster structure."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=2.0, size=(N_CLUSTERS, LAYERS, EXPERTS)).astype(np.float32)
    out = np.empty((n, LAYERS * EXPERTS), np.float16)
    for s in range(0, n, 8192):
        b = min(8192, n - s)
        logits = centres[rng.integers(0, N_CLUSTERS, b)] + rng.normal(scale=0.7, size=(b, LAYERS, EXPERTS))
        p = np.exp(logits - logits.max(-1, keepdims=True))
        out[s : s + b] = (p / p.sum(-1, keepdims=True)).reshape(b, -1)
    return out


def sweep_cost(rows: int, ks: list[int], n_init: int, replicas: int, k_range: list[int]) -> dict:
    """CPU seconds of one sweep task (k-means with ``n_init`` restarts + silhouette) on a ``rows``-row
    sample, one torch thread (a sweep actor), for each k in ``ks``; projects the sweep over ``k_range``
    (linear interpolation in k, ``replicas`` actors on a quiet box with that many cores)."""
    from selectmoe.cluster.registry import get_clusterer
    from selectmoe.cluster.sweep import _SweepWorker

    X = synthetic_routing(rows, seed=1)
    worker = _SweepWorker(X, None, get_clusterer("spherical_kmeans"), None, 1, rows, 0, rows)
    per_k = {}
    for k in ks:
        c0, t0 = time.process_time(), time.perf_counter()
        (fit,) = worker.fit([k], dict(n_init=n_init, max_iter=300, tol=1e-4, seed=0))
        cpu_s = time.process_time() - c0
        per_k[k] = {"cpu_s": round(cpu_s, 2), "wall_s": round(time.perf_counter() - t0, 2),
                    "n_iter_best": fit.n_iter}  # fmt: skip
        print(f"sweep cost k={k}: {per_k[k]}", file=sys.stderr, flush=True)
    grid = list(range(k_range[0], k_range[1] + 1))
    cpu = np.interp(grid, ks, [per_k[k]["cpu_s"] for k in ks])
    # data-independent unit: one Lloyd iteration (assign + sums) on this sample at k, timed alone
    import torch

    from selectmoe.cluster.kmeans import assign

    x = worker.X.t
    for k in ks:
        C = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:k]]
        c0 = time.process_time()
        for _ in range(3):
            lab, _ = assign(x, C)
            torch.zeros(k, x.shape[1]).index_add_(0, lab, x)
        per_k[k]["cpu_s_per_iter"] = round((time.process_time() - c0) / 3, 3)
    it = np.interp(grid, ks, [per_k[k]["cpu_s_per_iter"] for k in ks])
    return {
        "rows": rows,
        "n_init": n_init,
        "per_k": per_k,
        "projected_sweep_cpu_s": round(float(cpu.sum()), 1),
        "projected_sweep_wall_s_quiet": round(float(cpu.sum()) / replicas, 1),
        # at 50 Lloyd iterations per restart (real routing converges slower than these synthetic clusters)
        "projected_sweep_wall_s_quiet_50_iters": round(float(it.sum()) * 50 * n_init / replicas, 1),
    }


def compare_sample(n: int, work: Path, sample_rows: int, args) -> dict:
    """Select twice on one pool: exact (the whole pool fitted) and from a ``sample_rows``-row fit sample;
    chosen k of each and the Jaccard index of the selected ids."""
    import ray
    from omegaconf import OmegaConf

    from selectmoe.config import SelectConfig
    from selectmoe.data.ingest import ingest_pool
    from selectmoe.stages.select import run_select

    root = work / f"cmp{n}"
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "ingest" / "_manifest.json").is_file():
        write_pool(root / "pool.jsonl", n, seed=n)
        ingest_pool([str(root / "pool.jsonl")], root / "ingest")
    if not (root / "router" / "shards").is_dir():
        write_router_data(root / "ingest", root / "router", n)
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")  # fmt: skip
    got = {}
    for name, rows in (("exact", n), ("sampled", sample_rows)):
        base = SelectConfig(
            router_dir=str(root / "router"), pool_dir=str(root / "ingest"), output_dir=str(root / name),
            k_range=list(args.k_range), n_init=args.n_init, num_replicas=args.replicas, plots=False,
            fit_sample_rows=rows, silhouette_sample_rows=rows,
        )  # fmt: skip
        cfg = OmegaConf.to_object(
            OmegaConf.merge(OmegaConf.structured(base), OmegaConf.from_dotlist(args.select))
        )
        t = time.perf_counter()
        res = run_select(cfg)
        ids = [json.loads(x)["id"] for x in (root / name / "selected_data.jsonl").read_text().splitlines()]
        got[name] = {"k": res.chosen_k, "ids": set(ids), "wall_s": round(time.perf_counter() - t, 1)}
    ray.shutdown()
    a, b = got["exact"]["ids"], got["sampled"]["ids"]
    return {
        "rows": n,
        "sample_rows": sample_rows,
        "k_exact": got["exact"]["k"],
        "k_sampled": got["sampled"]["k"],
        "jaccard_selected": round(len(a & b) / len(a | b), 4),
        "wall_s": {k: v["wall_s"] for k, v in got.items()},
    }


# --- one size -------------------------------------------------------------------------------------
def run_size(n: int, work: Path, args) -> dict:
    import logging

    from selectmoe.config import SelectConfig
    from selectmoe.data.ingest import ingest_pool, validate_main
    from selectmoe.report import build_router_report
    from selectmoe.stages.select import run_select

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    root = work / f"n{n}"
    root.mkdir(parents=True, exist_ok=True)
    pool_file = root / "pool.jsonl"
    stages: dict[str, dict] = {}

    def stage(name, fn, out_dir):
        t = time.perf_counter()
        with PeakPss() as m:
            fn()
        stages[name] = {
            "wall_s": round(time.perf_counter() - t, 1),
            "peak_pss_gb": round(m.peak / 2**30, 2),
            "cpu_s": round(m.cpu_s, 1),
            "disk_gb": round(du(out_dir) / 2**30, 3) if out_dir else None,
        }
        print(f"[{n}] {name}: {stages[name]}", file=sys.stderr, flush=True)

    if not pool_file.is_file():
        write_pool(pool_file, n, seed=n)
    stage("validate", lambda: validate_main([str(pool_file)], root / "validate"), root / "validate")
    if not (root / "ingest" / "_manifest.json").is_file():
        stage("ingest", lambda: ingest_pool([str(pool_file)], root / "ingest"), root / "ingest")
    if not (root / "router" / "shards").is_dir():
        stage(
            "router data (write)",
            lambda: write_router_data(root / "ingest", root / "router", n),
            root / "router",
        )
    stages["router data (write)"] = stages.get("router data (write)", {}) | {
        "disk_gb": round(du(root / "router") / 2**30, 3),
        "bytes_per_row": round(du(root / "router") / n),
    }

    import ray

    cpus = args.cpus
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")  # fmt: skip
    from omegaconf import OmegaConf

    base = SelectConfig(
        router_dir=str(root / "router"),
        pool_dir=str(root / "ingest"),
        output_dir=str(root / "select"),
        k_range=list(args.k_range),
        n_init=args.n_init,
        num_replicas=args.replicas,
        plots=False,
    )
    cfg = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(base), OmegaConf.from_dotlist(args.select))
    )
    box = {}
    stage("select", lambda: box.setdefault("res", run_select(cfg)), root / "select")
    res = box["res"]
    stages["select"] |= {k: round(v, 1) for k, v in res.timings.items()} | {"chosen_k": res.chosen_k}
    ray.shutdown()
    stage("router report", lambda: build_router_report(root / "router", root / "report"), root / "report")
    sel = json.loads((root / "select" / "selection.json").read_text())
    return {"rows": n, "stages": stages, "fit": sel["fit"], "k_curves": sel["k_curves"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--work", type=Path, default=Path("/tmp/scale-bench"))
    p.add_argument("--k-range", type=int, nargs=2, default=[10, 100])
    p.add_argument("--n-init", type=int, default=3)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--select", nargs="*", default=[], help="more SelectConfig overrides KEY=VALUE")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the per-size subprocess
    p.add_argument("--out", type=Path, default=None, help="append each size's JSON line here")
    p.add_argument("--sweep-cost", type=int, nargs="+", default=None, metavar="K",
                   help="only time one sweep task per K on a --rows[0]-row sample and project the sweep")  # fmt: skip
    p.add_argument("--compare-sample", type=int, default=None, metavar="ROWS",
                   help="only select --rows[0] rows exactly and from a ROWS-row fit sample; print k and Jaccard")  # fmt: skip
    args = p.parse_args(argv)
    if args.compare_sample:
        print(json.dumps(compare_sample(args.rows[0], args.work, args.compare_sample, args)))
        return 0
    if args.sweep_cost:
        print(json.dumps(sweep_cost(args.rows[0], args.sweep_cost, args.n_init, args.replicas, args.k_range)))
        return 0
    if args.one:
        result = run_size(args.rows[0], args.work, args)
        print(json.dumps(result))
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(result) + "\n")
        return 0
    results = []
    for n in args.rows:
        proc = subprocess.run(
            [sys.executable, __file__, "--one", "--rows", str(n), "--work", str(args.work),
             "--k-range", *map(str, args.k_range), "--n-init", str(args.n_init), "--replicas",
             str(args.replicas), "--cpus", str(args.cpus), *(["--select", *args.select] if args.select else []),
             *(["--out", str(args.out)] if args.out else [])],
            stdout=subprocess.PIPE, text=True, check=True,
        )  # fmt: skip
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print_table(results)
    return 0


def print_table(results: list[dict]) -> None:
    names = list(results[0]["stages"])
    print("| stage | " + " | ".join(f"{r['rows']:,} rows" for r in results) + " | growth |")
    print("|---|" + "---|" * (len(results) + 1))
    for name in names:
        cells = []
        for r in results:
            s = r["stages"].get(name, {})
            cells.append(
                f"{s.get('wall_s', '-')} s (CPU {s.get('cpu_s', '-')} s), {s.get('peak_pss_gb', '-')} GB PSS, "
                f"{s.get('disk_gb', '-')} GB disk"
            )
        growth = ""
        if len(results) > 1:
            a, b = results[-2]["stages"].get(name, {}), results[-1]["stages"].get(name, {})
            if a.get("wall_s") and b.get("wall_s"):
                growth = f"time x{b['wall_s'] / a['wall_s']:.1f}, PSS x{b['peak_pss_gb'] / max(a['peak_pss_gb'], 1e-9):.1f}"
        print(f"| {name} | " + " | ".join(cells) + f" | {growth} |")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
