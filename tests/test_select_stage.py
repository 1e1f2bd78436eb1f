import json

import numpy as np
import pytest
from pool_shards import chat, write_pool_shard

from selectmoe.cli import main
from selectmoe.config import SelectConfig
from selectmoe.manifest import write_manifest
from selectmoe.router_data import RouterDataWriter
from selectmoe.stages.select import run_select

L, E = 2, 4


def make_inputs(tmp_path, n_per_shard=40, drop_from_pool=()):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, L * E))
    router, pool = tmp_path / "router", tmp_path / "pool"
    (pool / "shards").mkdir(parents=True)
    quality = {}
    for s in range(2):
        name = f"part-{s:05d}"
        ids = [f"s{s}-{i:03d}" for i in range(n_per_shard)]
        feats = np.abs(centres[rng.integers(0, 3, n_per_shard)] + 0.1 * rng.normal(size=(n_per_shard, L * E)))
        q = rng.uniform(size=n_per_shard).astype(np.float32)
        quality.update(zip(ids, q.tolist()))
        w = RouterDataWriter(router, name, L, E)
        w.write_batch(
            {
                "id": ids,
                "dataset": ["ds"] * n_per_shard,
                "n_tokens": np.full(n_per_shard, 10),
                "truncated": np.zeros(n_per_shard, bool),
                "quality": q,
                "quality_layers": np.repeat(q[:, None], L, 1),
                "routing": feats,
            }
        )
        w.close()
        keep = [i for i in ids if i not in drop_from_pool]
        write_pool_shard(pool / "shards" / f"{name}.parquet", keep, dataset="ds", row_group_size=16)
    return router, pool, quality


def _cfg(router, pool, out, **kw):
    base = dict(
        router_dir=str(router),
        pool_dir=str(pool),
        output_dir=str(out),
        selection_percentage=0.1,
        k_range=[2, 5],
        n_init=2,
        seed=0,
        num_replicas=2,
        plots=False,
        score="gate",  # these router shards carry only the gate score
        policy="round_robin",
        rank_within="pool",  # the raw gate value is each row's `scores` (one dataset: same order either way)
    )
    base.update(kw)
    return SelectConfig(**base)


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_run_select_sweep_end_to_end(tmp_path, ray_local):
    router, pool, quality = make_inputs(tmp_path)
    res = run_select(_cfg(router, pool, tmp_path / "out", plots=True))
    out = tmp_path / "out"
    assert (res.n_pool, res.budget, res.n_selected) == (80, 8, 8)
    sel = _lines(out / "selected_data.jsonl")
    assert len(sel) == 8 and len({r["id"] for r in sel}) == 8
    for r in sel:
        assert r["id"] in quality and r["messages"] == chat(r["id"]) and r["dataset"] == "ds"
        assert r["scores"] == pytest.approx(quality[r["id"]])
    info = json.loads((out / "selection.json").read_text())
    assert info["k_curves"]["k"] == [2, 3, 4, 5] and len(info["k_curves"]["silhouette"]) == 4
    assert info["chosen_k"] == res.chosen_k and info["k_choice"] == "elbow"
    assert info["counts"] == {"pool": 80, "selected": 8, "budget": 8}
    assert sum(info["clusters"]["sizes"]) == 80 and len(info["clusters"]["mean_quality"]) == res.chosen_k
    assert {r["cluster"] for r in sel} <= set(range(res.chosen_k))
    for name in ("random", "top_k"):
        assert len(_lines(out / f"selected_{name}.jsonl")) == 8
    top = _lines(out / "selected_top_k.jsonl")
    assert [r["id"] for r in top] == sorted(quality, key=lambda i: (-quality[i], i))[:8]
    assert sorted(p.name for p in (out / "plots").iterdir()) == [
        "cluster_sizes.png",
        "k_sweep.png",
        "score_hist.png",
    ]
    assert json.loads((out / "_manifest.json").read_text())["stage"] == "select"
    # rerun: identical files
    run_select(_cfg(router, pool, tmp_path / "out2", plots=True))
    for name in ("selected_data.jsonl", "selected_random.jsonl", "selection.json"):
        assert (out / name).read_bytes() == (tmp_path / "out2" / name).read_bytes()


def test_fixed_k_policies_and_cli(tmp_path):
    router, pool, _ = make_inputs(tmp_path)
    res = run_select(_cfg(router, pool, tmp_path / "o", k=3, policy="proportional", baselines=[]))
    assert res.chosen_k == 3 and res.k_choice == "fixed" and res.n_selected == 8
    assert [p.name for p in sorted((tmp_path / "o").glob("selected*.jsonl"))] == ["selected_data.jsonl"]
    # CLI: explicit pool dir + overrides
    assert (
        main(
            [
                "select",
                str(router),
                "--pool-dir",
                str(pool),
                "--out",
                str(tmp_path / "c"),
                "k=3",
                "selection_percentage=0.25",
                "plots=false",
                "baselines=[]",
                "score=gate",
            ]
        )
        == 0
    )
    assert len(_lines(tmp_path / "c" / "selected_data.jsonl")) == 20
    # CLI batch: pool dir from the score manifest, output into <dir>/selection, skipped when complete
    write_manifest(router, stage="score", config={"ingest_dir": str(pool)})
    argv = ["select", "--batch", str(tmp_path), "k=2", "plots=false", "baselines=[]", "score=gate"]
    assert main(argv) == 0
    assert len(_lines(router / "selection" / "selected_data.jsonl")) == 4
    mtime = (router / "selection" / "_manifest.json").stat().st_mtime_ns
    assert main(argv) == 0
    assert (router / "selection" / "_manifest.json").stat().st_mtime_ns == mtime
    # no pool dir anywhere -> clear error
    (router / "_manifest.json").unlink()
    assert main(["select", str(router), "k=2", "score=gate"]) == 2


def test_missing_ids_error(tmp_path):
    router, pool, _ = make_inputs(tmp_path, drop_from_pool={"s0-000", "s1-001"})
    with pytest.raises(ValueError, match="not found in the pool") as err:
        run_select(_cfg(router, pool, tmp_path / "o", k=2, policy="top_k", selection_percentage=1.0))
    assert "s0-000" in str(err.value) and "s1-001" in str(err.value)
