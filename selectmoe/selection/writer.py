"""Streaming join of selected ids against the ingested pool and the ``selected_*.jsonl`` writer."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from selectmoe.data.ingest import list_shards


def fetch_messages(
    pool_dir: str | os.PathLike, ids: Iterable[str], *, batch_rows: int = 8192
) -> dict[str, str]:
    """``{id: messages JSON string}`` for the wanted ids, streaming the pool shards batch by batch.

    Only rows whose id is wanted are kept, so memory is O(selected), not O(pool). The first occurrence
    of an id (pool order) wins. Raises ``ValueError`` naming up to 5 ids that are not in the pool.
    """
    wanted = set(ids)
    shards = list_shards(pool_dir)
    if wanted and not shards:
        raise FileNotFoundError(f"no ingested shards under {Path(pool_dir) / 'shards'}")
    value_set = pa.array(sorted(wanted), pa.string())
    found: dict[str, str] = {}
    for path in shards:
        if len(found) == len(wanted):
            break
        pf = pq.ParquetFile(str(path))
        for batch in pf.iter_batches(batch_size=batch_rows, columns=["id", "messages"]):
            mask = pc.is_in(batch.column("id"), value_set=value_set)
            if not pc.any(mask).as_py():
                continue
            kept = batch.filter(mask)
            for i, m in zip(kept.column("id").to_pylist(), kept.column("messages").to_pylist()):
                found.setdefault(i, m)
    missing = sorted(wanted - found.keys())
    if missing:
        raise ValueError(
            f"{len(missing)} selected id(s) not found in the pool shards under {pool_dir}: "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    return found


def write_selection_jsonl(
    path: str | os.PathLike,
    indices: Sequence[int],
    *,
    ids: Sequence[str],
    datasets: Sequence[str],
    scores: Sequence[float],
    labels: Sequence[int],
    messages: dict[str, str],
) -> int:
    """One line per selected row, in selection order: ``{"dataset", "id", "scores", "cluster", "messages"}``.
    Written to a temp file and renamed, so a partial file never looks complete."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for i in indices:
            i = int(i)
            rec = {
                "dataset": datasets[i],
                "id": ids[i],
                "scores": float(scores[i]),
                "cluster": int(labels[i]),
                "messages": json.loads(messages[ids[i]]),
            }
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return len(indices)
