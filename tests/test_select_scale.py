"""Select at scale: the sampled fit equals the exact path when the pool fits in the sample, the join keeps
selection order, over-requests are fitted or refused (never a hang), GPU actors spread one per GPU."""

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from selectmoe.config import SelectConfig
from selectmoe.router_data import RouterDataWriter
from selectmoe.stages.select import run_select

L, E = 4, 8
DATASETS = ["alpha", "beta", "gamma", "delta"]


def _msgs(i):
    return [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": f"a {i}"}]


def make_pool(tmp_path, *, n_per_shard=150, shards=3, hidden_dim=0, routing=True, seed=7):
    """Router data (fp16 routing with 5 clusters, 4 datasets) + an ingested pool with the same shard names;
    pool rows are in a different order from the router rows (score writes by length, not pool order)."""
    rng = np.random.default_rng(seed)
    centres = rng.gamma(1.0, size=(5, L * E))
    hcentres = rng.normal(size=(3, max(hidden_dim, 1)))
    router, pool = tmp_path / "router", tmp_path / "pool"
    (pool / "shards").mkdir(parents=True)
    for s in range(shards):
        name = f"{s:05d}-pool-00000"
        ids = [f"{s}-{i:04d}-{rng.integers(1 << 30):x}" for i in range(n_per_shard)]
        lab = rng.integers(0, 5, n_per_shard)
        feats = np.abs(centres[lab] + 0.3 * rng.normal(size=(n_per_shard, L * E))).astype(np.float16)
        cols = {
            "id": ids,
            "dataset": [DATASETS[j] for j in rng.integers(0, 4, n_per_shard)],
            "n_tokens": np.full(n_per_shard, 10),
            "truncated": np.zeros(n_per_shard, bool),
            "quality": rng.uniform(size=n_per_shard).astype(np.float32),
            "response_nll": rng.uniform(1, 3, size=n_per_shard).astype(np.float32),
            "quality_layers": rng.uniform(size=(n_per_shard, L)).astype(np.float32),
            "routing": feats,
        }
        if hidden_dim:
            hl = rng.integers(0, 3, n_per_shard)
            cols["hidden"] = (hcentres[hl] + 0.2 * rng.normal(size=(n_per_shard, hidden_dim))).astype(
                np.float16
            )
        if not routing:
            cols.pop("routing")
        w = RouterDataWriter(router, name, L, E)
        w.write_batch(cols)
        w.close()
        order = rng.permutation(n_per_shard)
        keep = [ids[i] for i in order]
        pq.write_table(
            pa.table(
                {
                    "id": keep,
                    "dataset": ["x"] * len(keep),
                    "messages": [json.dumps(_msgs(i)) for i in keep],
                    "source_file": ["f.jsonl"] * len(keep),
                    "source_line": list(range(len(keep))),
                }
            ),
            pool / "shards" / f"{name}.parquet",
            row_group_size=32,
        )
    return router, pool


def _cfg(router, pool, out, **kw):
    base = dict(
        router_dir=str(router),
        pool_dir=str(pool),
        output_dir=str(out),
        selection_percentage=0.1,
        k_range=[2, 8],
        n_init=2,
        seed=3,
        num_replicas=2,
        plots=False,
        score="gate",
        policy="quality_round_robin",
        rank_within="dataset",
    )
    base.update(kw)
    return SelectConfig(**base)


def _ids(path):
    return [json.loads(x)["id"] for x in path.read_text().splitlines()]


def _digest(ids):
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


# Computed with the exact path of main at b9ef93c (before sampled fitting): chosen k, then the sha256 of
# the selected ids in file order, for selected_data / random / top_k.
GOLDEN = {
    "quality_round_robin": (5, "3d0743f0d251214d", "a960b97d3df5ec8c", "44da1a5d6b1611b9"),
    "round_robin": (5, "a030e7d447f4258e", "a960b97d3df5ec8c", "dcdf18ecf32eb990"),
}
GOLDEN_INERTIA = [63.873057, 42.616323, 23.925343, 7.124336, 7.01363, 6.954056, 6.869452]
GOLDEN_SILHOUETTE = [0.461708, 0.60438, 0.760412, 0.917749, 0.755053, 0.580748, 0.413584]


def test_pool_within_sample_equals_the_exact_path(tmp_path, ray_local):
    router, pool = make_pool(tmp_path)
    runs = {
        "quality_round_robin": {},
        "round_robin": dict(policy="round_robin", rank_within="pool", k_choice="silhouette"),
    }
    for name, kw in runs.items():
        out = tmp_path / name
        res = run_select(_cfg(router, pool, out, fit_sample_rows=450, **kw))
        got = (
            res.chosen_k,
            *(
                _digest(_ids(out / f))
                for f in ("selected_data.jsonl", "selected_random.jsonl", "selected_top_k.jsonl")
            ),
        )
        assert got == GOLDEN[name]
        info = json.loads((out / "selection.json").read_text())
        assert [round(v, 6) for v in info["k_curves"]["inertia"]] == GOLDEN_INERTIA
        assert [round(v, 6) for v in info["k_curves"]["silhouette"]] == GOLDEN_SILHOUETTE
        assert info["k_curves"]["silhouette_se"] == [0.0] * 7  # exact: over the whole pool
        assert info["fit"]["exact"] and info["fit"]["sample_rows"] == 450
    # the assignment file: every row, pool order, clusters = the selection's, cosines of unit rows
    a = pq.read_table(tmp_path / "round_robin" / "assignments.parquet")
    assert a.num_rows == 450 and a.column_names == ["id", "cluster", "cosine"]
    sel = [json.loads(x) for x in (tmp_path / "round_robin" / "selected_data.jsonl").read_text().splitlines()]
    cl = dict(zip(a.column("id").to_pylist(), a.column("cluster").to_pylist()))
    assert all(cl[r["id"]] == r["cluster"] for r in sel)
    assert float(np.min(a.column("cosine"))) > 0.5 and float(np.max(a.column("cosine"))) <= 1.0 + 1e-6


def test_sampled_fit_assigns_every_row_and_reports_standard_error(tmp_path, ray_local):
    router, pool = make_pool(tmp_path)
    out = tmp_path / "s"
    res = run_select(_cfg(router, pool, out, fit_sample_rows=200, silhouette_sample_rows=120, k_range=[3, 6]))
    info = json.loads((out / "selection.json").read_text())
    assert info["fit"] == {
        "actors": 2, "exact": False, "features": ["routing"], "notices": [], "sample_rows": 200,
        "silhouette_rows": 120,
    }  # fmt: skip
    # 5 well-separated clusters: the sample finds them and the assignment labels all 450 rows
    assert res.chosen_k == 5 and sum(info["clusters"]["sizes"]) == 450
    se = info["k_curves"]["silhouette_se"]
    assert all(0 < v < 0.05 for v in se)
    # the pool inertia comes from the assignment pass over every row, not the sample's
    cos = pq.read_table(out / "assignments.parquet").column("cosine").to_numpy()
    assert info["chosen"]["inertia"] == float((1.0 - cos.astype(np.float64)).clip(min=0).sum())
