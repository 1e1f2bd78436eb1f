"""The join of selected rows against the ingested pool and the ``selected_*.jsonl`` writer.

The join runs one task per pool shard (Ray tasks when Ray is up and there is enough to look up, else
in-process): a router shard is
named after the ingest shard it scored, so each selected row's shard is known and a task reads that one
shard's ``id`` column once, finds its wanted ids in it with one hash lookup (``pc.index_in``), and takes
their messages. Memory: O(selected) in the driver, one shard in a task. Ids not found in their named
shard (router data scored from another ingest) are looked up in every shard before failing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from selectmoe.data.ingest import list_shards


def _join_shard(path: str, wanted: pa.Array) -> tuple[list[str], list[str]]:
    """(found ids, their messages) of ``wanted`` in one pool shard, first occurrence in the shard."""
    ids = pq.read_table(path, columns=["id"]).column("id").combine_chunks()
    pos = pc.index_in(wanted, value_set=ids)
    found = pc.is_valid(pos)
    rows = pc.filter(pos, found)
    if len(rows) == 0:
        return [], []
    messages = pq.read_table(path, columns=["messages"]).column("messages").take(rows)
    return pc.filter(wanted, found).to_pylist(), messages.to_pylist()


# Below this many wanted ids per shard a Ray task (a worker process) costs more than the lookup itself.
IDS_PER_TASK_MIN = 2_000


def _run(calls: list[tuple[str, pa.Array]]) -> list[tuple[list[str], list[str]]]:
    import ray

    wanted = sum(len(w) for _, w in calls)
    if ray.is_initialized() and len(calls) > 1 and wanted >= IDS_PER_TASK_MIN * len(calls):
        task = ray.remote(num_cpus=1)(_join_shard)
        return ray.get([task.remote(p, w) for p, w in calls])
    return [_join_shard(p, w) for p, w in calls]


def fetch_messages(
    pool_dir: str | os.PathLike, wanted_by_shard: Mapping[str, Sequence[str]]
) -> dict[str, str]:
    """``{id: messages JSON string}`` for ``wanted_by_shard`` (``{shard name: ids}``; the name of the pool
    shard expected to hold them, or ``""`` for unknown). Raises ``ValueError`` naming up to 5 ids that
    are in no pool shard."""
    shards = list_shards(pool_dir)
    total = {i for ids in wanted_by_shard.values() for i in ids}
    if total and not shards:
        raise FileNotFoundError(f"no ingested shards under {Path(pool_dir) / 'shards'}")
    by_name = {p.stem: str(p) for p in shards}
    calls = [
        (by_name[name], pa.array(sorted(set(ids)), pa.string()))
        for name, ids in wanted_by_shard.items()
        if ids and name in by_name
    ]
    found: dict[str, str] = {}
    for got, msgs in _run(calls):
        found.update(zip(got, msgs))
    rest = sorted(total - found.keys())
    if rest:  # not in the shard of their name: look everywhere (pool order: the first occurrence wins)
        for got, msgs in _run([(str(p), pa.array(rest, pa.string())) for p in shards]):
            for i, m in zip(got, msgs):
                found.setdefault(i, m)
    missing = sorted(total - found.keys())
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
    ids: Mapping[int, str] | Sequence[str],
    datasets: Mapping[int, str] | Sequence[str],
    scores: Sequence[float],
    labels: Sequence[int],
    messages: Mapping[str, str],
) -> int:
    """One line per selected row, in selection order: ``{"dataset", "id", "scores", "cluster", "messages"}``.
    ``ids``/``datasets``: indexable by row (a dict of the selected rows is enough). Written to a temp file
    and renamed, so a partial file never looks complete."""
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
