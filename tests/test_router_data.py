"""Router-data shards: schema, atomic shard files, memory-mapped routing view."""

from __future__ import annotations

import numpy as np
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


def test_round_trip_and_memmap(tmp_path):
    r1 = _write(tmp_path, "00000-a", ["a0", "a1", "a2"], seed=1)
    r2 = _write(tmp_path, "00001-b", ["b0", "b1"], seed=2)
    data = load_router_data(tmp_path)
    assert data.ids == ["a0", "a1", "a2", "b0", "b1"]
    assert isinstance(data.routing, np.memmap) and data.routing.dtype == np.float16
    expected = np.concatenate([r1, r2]).reshape(5, -1).astype(np.float16)
    np.testing.assert_array_equal(np.asarray(data.routing), expected)
    assert data.quality.dtype == np.float32 and data.quality_layers.shape == (5, 2)


def test_cache_invalidated_when_a_shard_is_rescored(tmp_path):
    _write(tmp_path, "00000-a", ["a0", "a1"], seed=1)
    first = np.asarray(load_router_data(tmp_path).routing).copy()
    _write(tmp_path, "00000-a", ["a0", "a1"], seed=9)
    second = np.asarray(load_router_data(tmp_path).routing)
    assert not np.array_equal(first, second)


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
