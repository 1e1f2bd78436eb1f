"""Router-data shards: schema, atomic shard files, row groups, streaming feature reads."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from selectmoe.router_data import RouterDataWriter, load_router_data, shard_paths


def _write(directory, name, ids, layers=2, experts=3, seed=0):
    rng = np.random.default_rng(seed)
    writer = RouterDataWriter(directory, name, layers, experts)
    routing = rng.random((len(ids), layers, experts)).astype(np.float32)
    writer.write_batch(
        {
            "id": ids,
            "dataset": ["d"] * len(ids),
            "n_tokens": np.arange(len(ids)),
            "truncated": [False] * len(ids),
            "quality": rng.random(len(ids)),
            "quality_layers": rng.random((len(ids), layers)),
            "routing": routing,
        }
    )
    writer.close()
    return routing


def test_round_trip(tmp_path):
    r1 = _write(tmp_path, "00000-a", ["a0", "a1", "a2"], seed=1)
    r2 = _write(tmp_path, "00001-b", ["b0", "b1"], seed=2)
    data = load_router_data(tmp_path, features=True)
    assert data.ids == ["a0", "a1", "a2", "b0", "b1"]
    assert data.routing.dtype == np.float16
    expected = np.concatenate([r1, r2]).reshape(5, -1).astype(np.float16)
    np.testing.assert_array_equal(data.routing, expected)
    assert data.quality.dtype == np.float32 and data.quality_layers.shape == (5, 2)
    assert load_router_data(tmp_path).routing is None  # the small columns only, unless asked
    assert not (tmp_path / "_cache").exists()  # no second copy of the routing on disk


def test_row_groups_are_large_and_routing_is_not_dictionary_encoded(tmp_path):
    from selectmoe.router_data import ROW_GROUP_ROWS

    writer = RouterDataWriter(tmp_path, "00000-a", 2, 3)
    rng = np.random.default_rng(0)
    n = 0
    for _ in range(50):  # the score writer hands over small batches (a model batch at a time)
        b = 700
        routing = rng.random((b, 6)).astype(np.float16)
        writer.write_batch(
            {
                "id": [f"r{n + i}" for i in range(b)],
                "dataset": ["d"] * b,
                "n_tokens": np.ones(b),
                "truncated": np.zeros(b, bool),
                "quality": np.zeros(b),
                "quality_layers": np.zeros((b, 2)),
                "routing": routing,
            }
        )
        n += b
    path = writer.close()
    meta = pq.ParquetFile(path).metadata
    sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    # flushed at the first batch that reaches ROW_GROUP_ROWS (16,384): 24 batches of 700
    assert ROW_GROUP_ROWS == 16384 and sizes == [16_800, 16_800, 1_400]
    cols = {
        meta.row_group(0).column(c).path_in_schema: meta.row_group(0).column(c).encodings
        for c in range(meta.num_columns)
    }
    assert any("DICTIONARY" in e for e in cols["id"])
    assert not any("DICTIONARY" in e for e in cols["routing.list.element"])


def test_hidden_column_round_trip(tmp_path):
    from selectmoe.router_data import feature_widths, iter_feature_blocks

    writer = RouterDataWriter(tmp_path, "00000-a", 2, 3, hidden_dim=5)
    hidden = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float16)
    writer.write_batch(
        {
            "id": list("abcd"),
            "dataset": ["d"] * 4,
            "n_tokens": np.ones(4),
            "truncated": np.zeros(4, bool),
            "quality": np.zeros(4),
            "quality_layers": np.zeros((4, 2)),
            "routing": np.zeros((4, 6), np.float16),
            "hidden": hidden,
        }
    )
    writer.close()
    assert feature_widths([tmp_path / "shards" / "00000-a.parquet"]) == {"routing": 6, "hidden": 5}
    [(_, block)] = list(iter_feature_blocks([tmp_path / "shards" / "00000-a.parquet"], ["routing", "hidden"]))
    np.testing.assert_array_equal(block[:, 6:], hidden)


def test_aborted_writer_leaves_no_shard(tmp_path):
    writer = RouterDataWriter(tmp_path, "00000-a", 2, 3)
    writer.abort()
    assert shard_paths(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="no router-data shards"):
        load_router_data(tmp_path)


def test_wrong_feature_width_is_rejected(tmp_path):
    writer = RouterDataWriter(tmp_path, "x", 2, 3)
    with pytest.raises(ValueError, match="expected 2x3=6"):
        writer.write_batch(
            {
                "id": ["a"],
                "dataset": ["d"],
                "n_tokens": [1],
                "truncated": [False],
                "quality": [0.5],
                "quality_layers": [[0.1, 0.2]],
                "routing": [[0.0] * 5],
            }
        )
    writer.abort()
