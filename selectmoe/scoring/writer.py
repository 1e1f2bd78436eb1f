"""The score stage's driver side: rows from the pipeline -> one :class:`RouterDataWriter` per shard.

Why driver-side writers (and not a Datasink): the driver is the single place that sees every row of a
shard, so it can drop a row delivered twice by a retried task, count rows, close the shard the moment its
last row arrives and verify it (:func:`selectmoe.scoring.records.finish_shard`) *before* marking it done.
A Datasink writes per block on workers, which could neither dedupe across retried blocks nor know when a
shard is complete. Memory: only the open shards' Parquet writers and their id sets.

Test hook: ``SELECTMOE_SCORE_STOP_AFTER_SHARDS=<n>`` makes the driver raise :class:`ScoreInterrupted`
after ``n`` shards were completed (a killed job).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from selectmoe.router_data import PROMPT_KEY, RouterDataWriter
from selectmoe.scoring.records import finish_shard
from selectmoe.scoring.scorer import SHARD_COLUMN

logger = logging.getLogger(__name__)

STOP_AFTER_ENV = "SELECTMOE_SCORE_STOP_AFTER_SHARDS"


class ScoreInterrupted(RuntimeError):
    """Raised by the ``SELECTMOE_SCORE_STOP_AFTER_SHARDS`` test hook."""


def consume_shards(
    ds,
    out_dir: Path,
    names: Mapping[str, Path],
    inputs: Mapping[str, Mapping[str, Any]],
    model_fp: str,
    *,
    make_writer: Callable[[str], RouterDataWriter],
    stop_after: int = 0,
) -> Iterator[tuple[str, int, int]]:
    """Drive the dataset: route rows to per-shard writers (``make_writer(shard)``: the schema the scorer
    yields), drop rows a retried task delivered twice, close and verify each shard as its last row arrives.
    Yields ``(shard, rows, tokens)`` per finished shard."""
    writers: dict[str, RouterDataWriter] = {}
    seen: dict[str, set[str]] = {}
    tokens: dict[str, int] = {}
    done: set[str] = set()
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            shard_col = batch.column(SHARD_COLUMN)
            shard_names = pc.unique(shard_col).to_pylist()
            for name in shard_names:
                if name in done:  # a retried task re-delivered rows of a shard already closed
                    logger.warning("score: dropped re-delivered rows of finished shard %s", name)
                    continue
                sub = batch if len(shard_names) == 1 else batch.filter(pc.equal(shard_col, name))
                ids = sub.column("id").to_pylist()
                ids_seen = seen.setdefault(name, set())
                fresh = [i for i, x in enumerate(ids) if x not in ids_seen]
                if len(fresh) != len(ids):
                    logger.warning("score: dropped %d re-delivered rows of %s", len(ids) - len(fresh), name)
                    sub = sub.take(pa.array(fresh, pa.int64()))
                if sub.num_rows == 0:
                    continue
                ids_seen.update(sub.column("id").to_pylist())
                writer = writers.get(name)
                if writer is None:
                    writer = writers[name] = make_writer(name)
                writer.write_batch(_columns(sub))
                tokens[name] = tokens.get(name, 0) + int(pc.sum(sub.column("n_tokens")).as_py() or 0)
                if writer.rows >= inputs[name]["rows"]:
                    writers.pop(name).close()
                    seen.pop(name)
                    n = finish_shard(out_dir, name, names[name], inputs[name], model_fp)
                    done.add(name)
                    yield name, n, tokens.pop(name)
                    if stop_after and len(done) >= stop_after:
                        raise ScoreInterrupted(f"test hook {STOP_AFTER_ENV}={stop_after}: stopping")
        if writers:
            raise RuntimeError(
                "score pipeline ended with incomplete shards: "
                + ", ".join(f"{n} ({w.rows}/{inputs[n]['rows']} rows)" for n, w in writers.items())
            )
    finally:
        for writer in writers.values():
            writer.abort()


def _columns(table: pa.Table) -> dict[str, Any]:
    """The scorer's pyarrow batch as the writer's columns (fixed-size lists as ``[B, K]`` numpy)."""
    n = table.num_rows
    out: dict[str, Any] = {
        "id": table.column("id").to_pylist(),
        "dataset": table.column("dataset").to_pylist(),
        "truncated": table.column("truncated").to_numpy(zero_copy_only=False),
    }
    for col in table.column_names:
        if col in out or col == SHARD_COLUMN:
            continue
        field = table.schema.field(col)
        if col == PROMPT_KEY:  # nullable int64: Arrow as it is (numpy would turn a null into a float NaN)
            out[col] = table.column(col).combine_chunks()
        elif pa.types.is_fixed_size_list(field.type):
            arr = table.column(col).combine_chunks()
            out[col] = arr.flatten().to_numpy(zero_copy_only=False).reshape(n, field.type.list_size)
        else:
            out[col] = table.column(col).to_numpy()
    return out
