"""An ingested pool shard written the way the ingest stage writes it, for select tests that build their
router data by hand (the select stage joins the selected rows back to these shards)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def chat(i: str) -> list[dict[str, str]]:
    """Row ``i``'s conversation: the messages a test expects the selection to carry back."""
    return [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]


def write_pool_shard(path: Path, ids: Sequence[str], *, dataset: str, row_group_size: int) -> None:
    """One ingest shard (``id, dataset, messages, source_file, source_line``) holding ``ids`` in that order."""
    table = pa.table(
        {
            "id": list(ids),
            "dataset": [dataset] * len(ids),
            "messages": [json.dumps(chat(i)) for i in ids],
            "source_file": ["f.jsonl"] * len(ids),
            "source_line": list(range(len(ids))),
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size)
