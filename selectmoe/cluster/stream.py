"""The pool side of select's clustering: a seeded fit sample read row group by row group, and one
streaming assignment pass over every row (centroids broadcast, one task per router shard).

Memory: the sample (``fit_sample_rows`` x F float16) plus one row group per reader; the assignment keeps
only int32 clusters and float32 cosines per row, never the ``[N, F]`` matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from selectmoe.cluster.features import assign_block
from selectmoe.router_data import iter_feature_blocks, read_feature_rows

# Below this many rows per shard a Ray task (a worker importing torch) costs more than the pass itself.
ROWS_PER_TASK_MIN = 20_000


def _rows(shards: Sequence[Path]) -> int:
    return int(shard_row_counts(shards).sum())


def shard_row_counts(shards: Sequence[Path]) -> np.ndarray:
    """Rows per shard from the Parquet footers (nothing else is read)."""
    return np.array([pq.ParquetFile(p).metadata.num_rows for p in shards], dtype=np.int64)


def fit_sample_index(n: int, sample_rows: int, seed: int) -> np.ndarray | None:
    """Sorted pool rows of the fit sample; None when the whole pool fits (the exact path: all rows in
    pool order, so the sweep sees exactly the matrix it always did)."""
    if sample_rows <= 0 or n <= sample_rows:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=sample_rows, replace=False))


def read_sample(
    shards: Sequence[Path],
    rows_per_shard: np.ndarray,
    index: np.ndarray | None,
    columns: Sequence[str],
    widths: dict[str, int],
) -> np.ndarray:
    """float16 ``[m, F]``: the pool rows ``index`` (all when None) of the feature ``columns``."""
    if index is None:
        blocks = [b for _, b in iter_feature_blocks(shards, columns)]
        return np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
    starts = np.r_[0, np.cumsum(rows_per_shard)]
    parts = np.searchsorted(index, starts)
    jobs = [
        (shards[s], index[parts[s] : parts[s + 1]] - starts[s])
        for s in range(len(shards))
        if parts[s + 1] > parts[s]
    ]
    with ThreadPoolExecutor(max_workers=min(4, max(1, len(jobs)))) as ex:
        got = list(ex.map(lambda j: read_feature_rows(j[0], j[1], columns, widths), jobs))
    return np.concatenate(got) if len(got) > 1 else got[0]


def _assign_shard(path, columns, widths, centroids, threads: int = 1):
    import torch

    torch.set_num_threads(threads)
    labels, cos = [], []
    for _, block in iter_feature_blocks([path], columns):
        lab, c = assign_block(block, widths, centroids)
        labels.append(lab)
        cos.append(c)
    if not labels:
        return np.zeros(0, np.int32), np.zeros(0, np.float32)
    return np.concatenate(labels), np.concatenate(cos)


def assign_pool(
    shards: Sequence[Path], columns: Sequence[str], widths: dict[str, int], centroids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(cluster int32 [N], cosine float32 [N]) of every pool row, shard order. One Ray task per shard
    (centroids ``ray.put`` once) when Ray is up and the shards hold at least :data:`ROWS_PER_TASK_MIN`
    rows on average, else in-process."""
    w = [widths[c] for c in columns]
    import ray

    if ray.is_initialized() and len(shards) > 1 and len(shards) * ROWS_PER_TASK_MIN <= _rows(shards):
        task = ray.remote(num_cpus=1)(_assign_shard)
        c_ref = ray.put(np.asarray(centroids, np.float32))
        results = ray.get([task.remote(str(p), list(columns), w, c_ref) for p in shards])
    else:
        import torch

        results = [_assign_shard(p, columns, w, centroids, torch.get_num_threads()) for p in shards]
    return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])
