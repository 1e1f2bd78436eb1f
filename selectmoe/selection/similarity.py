"""Each pool row's best cosine similarity to each target task, streamed over the router-data shards.

Like the clustering's assignment pass (:func:`selectmoe.cluster.stream.assign_pool`): one Ray task per
shard when Ray is up and the shards are large enough to pay for it, else in-process; each reads its
features a row group at a time (:func:`selectmoe.router_data.iter_feature_blocks`), so no process holds more
than a row group of features, and returns only ``[rows, tasks]`` float32 similarities: the driver gathers
``N × tasks`` floats, never ``N × F``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from selectmoe.selection.targeted import best_similarity


def unit_rows(X: np.ndarray, widths: Sequence[int]) -> np.ndarray:
    """float32 unit rows of the feature blocks ``X`` (side by side, ``widths`` wide), normalised as the
    clustering normalises them (each block, then the row)."""
    from selectmoe.cluster.features import unit_features

    return unit_features(np.asarray(X), list(widths)).t.cpu().numpy()


def shard_similarity(
    path: str | Path,
    columns: Sequence[str],
    widths: Sequence[int],
    target_rows: np.ndarray,
    target_task: np.ndarray,
    n_tasks: int,
    threads: int = 1,
) -> np.ndarray:
    """float32 ``[rows of the shard, n_tasks]`` (:func:`best_similarity`), one row group at a time."""
    import torch

    from selectmoe.router_data import iter_feature_blocks

    torch.set_num_threads(threads)
    parts = [np.zeros((0, n_tasks), np.float32)]
    for _, block in iter_feature_blocks([Path(path)], list(columns)):
        parts.append(best_similarity(unit_rows(block, widths), target_rows, target_task, n_tasks))
    return np.concatenate(parts)


def pool_similarity(
    shards: Sequence[Path],
    columns: Sequence[str],
    widths: Mapping[str, int],
    target_rows: np.ndarray,
    target_task: Sequence[int],
    n_tasks: int,
) -> np.ndarray:
    """float32 ``[N, n_tasks]`` in shard order (the order select reads the pool in)."""
    import ray

    from selectmoe.cluster.stream import ROWS_PER_TASK_MIN, shard_row_counts

    w = [widths[c] for c in columns]
    rows = np.ascontiguousarray(target_rows, dtype=np.float32)
    task = np.asarray(target_task, dtype=np.int64)
    big = len(shards) * ROWS_PER_TASK_MIN <= int(shard_row_counts(shards).sum())
    if ray.is_initialized() and len(shards) > 1 and big:
        remote = ray.remote(num_cpus=1)(shard_similarity)
        ref = ray.put(rows)
        parts = ray.get([remote.remote(str(p), list(columns), w, ref, task, n_tasks) for p in shards])
    else:
        import torch

        threads = torch.get_num_threads()
        parts = [shard_similarity(p, columns, w, rows, task, n_tasks, threads) for p in shards]
    return np.concatenate(parts) if parts else np.zeros((0, n_tasks), np.float32)
