"""Ray Data over ingested shards: an ordered reader and the encoder as a ``map_batches`` callable class."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from selectmoe.data.encoding import ChatEncoder, EncodingSpec


def read_ingested(ingest_dir: str | os.PathLike, *, shards: Sequence[str | os.PathLike] | None = None):
    """A Ray Dataset over the ingested shards (``list_shards`` order, or ``shards`` as given), order kept.

    Sets ``DataContext.execution_options.preserve_order = True`` on the current context so downstream
    ``map_batches`` (actor pools included) keep the pool order.
    """
    import ray.data

    from selectmoe.data.ingest import list_shards

    paths = [str(p) for p in (shards if shards is not None else list_shards(ingest_dir))]
    if not paths:
        raise FileNotFoundError(f"no ingested shards under {ingest_dir} (run the ingest stage first)")
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    return ray.data.read_parquet(paths, file_extensions=["parquet"])


def _messages_column(table: pa.Table) -> list[list[dict[str, Any]]]:
    col = table.column("messages").to_pylist()
    return [json.loads(m) if isinstance(m, str) else list(m) for m in col]


class EncodeBatch:
    """``ds.map_batches(EncodeBatch, fn_constructor_kwargs={"tokenizer_dir": d, "spec": spec_dict},
    batch_format="pyarrow")``: adds ``input_ids``/``labels`` (``list<int32>``), ``n_tokens`` (int32) and
    ``truncated`` (bool) to every batch, keeping all other columns. The tokenizer is loaded once per actor.
    """

    def __init__(self, tokenizer_dir: str, spec: Mapping[str, Any] | EncodingSpec | None = None):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        self.encoder = ChatEncoder(self.tokenizer, EncodingSpec.from_dict(spec))

    def __call__(self, batch: pa.Table | Mapping[str, Any]) -> pa.Table:
        table = batch if isinstance(batch, pa.Table) else _to_table(batch)
        encoded = self.encoder.encode_many(_messages_column(table))
        new = {
            "input_ids": pa.array([e.input_ids for e in encoded], type=pa.list_(pa.int32())),
            "labels": pa.array([e.labels for e in encoded], type=pa.list_(pa.int32())),
            "n_tokens": pa.array([e.n_tokens for e in encoded], type=pa.int32()),
            "truncated": pa.array([e.truncated for e in encoded], type=pa.bool_()),
        }
        for name, arr in new.items():
            idx = table.schema.get_field_index(name)
            table = table.set_column(idx, name, arr) if idx >= 0 else table.append_column(name, arr)
        return table


def _to_table(batch: Mapping[str, Any]) -> pa.Table:
    cols = {}
    for k, v in batch.items():
        cols[k] = v.tolist() if hasattr(v, "tolist") else list(v)
    return pa.table(cols)
