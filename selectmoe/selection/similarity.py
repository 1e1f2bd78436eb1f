"""Each pool row's best cosine similarity to each target task, streamed over the router-data shards.

One Ray task per shard reads its feature columns one row group at a time
(:func:`shard_similarity`), so no process holds more than a row group of features, and returns only
``[rows, tasks]`` float32 similarities: the driver gathers ``N × tasks`` floats, never ``N × F``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from selectmoe.selection.targeted import best_similarity, feature_rows


def feature_columns(features: str) -> list[str]:
    return ["routing", "hidden"] if features == "both" else [features]


def _block(table, names: list[str]) -> dict[str, np.ndarray]:
    out = {}
    for name in names:
        col = table.column(name).combine_chunks()
        width = col.type.list_size
        out[name] = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    return out


def shard_similarity(
    path: str | Path, target_rows: np.ndarray, target_task: np.ndarray, n_tasks: int, features: str
) -> np.ndarray:
    """float32 ``[rows of the shard, n_tasks]`` (:func:`best_similarity`), one row group at a time."""
    names = feature_columns(features)
    reader = pq.ParquetFile(path)
    missing = [c for c in names if c not in reader.schema_arrow.names]
    if missing:
        raise ValueError(
            f"select.features={features}: router-data shard {path} has no {missing} column"
            + (" (score with score.hidden=true)" if "hidden" in missing else "")
        )
    parts = [np.zeros((0, n_tasks), np.float32)]
    for group in range(reader.num_row_groups):
        rows = feature_rows(_block(reader.read_row_group(group, columns=names), names), features)
        parts.append(best_similarity(rows, target_rows, target_task, n_tasks))
    return np.concatenate(parts)


def pool_similarity(
    shards: Sequence[str | Path],
    target_rows: np.ndarray,
    target_task: Sequence[int],
    n_tasks: int,
    features: str,
    *,
    use_ray: bool = True,
) -> np.ndarray:
    """float32 ``[N, n_tasks]`` in the order of ``shards`` (the order of ``load_router_data``)."""
    target_rows = np.ascontiguousarray(target_rows, dtype=np.float32)
    task = np.asarray(target_task, dtype=np.int64)
    if not use_ray:
        parts = [shard_similarity(p, target_rows, task, n_tasks, features) for p in shards]
    else:
        import ray

        remote = ray.remote(num_cpus=1)(shard_similarity)
        ref = ray.put(target_rows)
        parts = ray.get([remote.remote(str(p), ref, task, n_tasks, features) for p in shards])
    return np.concatenate(parts) if parts else np.zeros((0, n_tasks), np.float32)
