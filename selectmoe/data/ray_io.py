"""Ray Data over ingested shards: an ordered reader and THE encoder on Ray Data.

The encoder runs one way for every stage (warmup, score, finetune): :func:`encode_rows` as a
``map_batches`` task (fused with the read, spread over every free CPU), with the tokenizer built once per
worker process (:func:`cached_encoder`). :class:`EncodeBatch` is the callable it caches.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pyarrow as pa

from selectmoe import storage
from selectmoe.data.encoding import ChatEncoder, EncodingSpec

# The columns THE encoder adds (their Arrow types).
ENCODED_TYPES = {
    "input_ids": pa.list_(pa.int32()),
    "labels": pa.list_(pa.int32()),
    "n_tokens": pa.int32(),
    "dataset": pa.string(),
    "truncated": pa.bool_(),
    "full_tokens": pa.int32(),
}


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
    fs = storage.resolve(paths[0])[0]  # one filesystem (its endpoint and keys travel to the read tasks)
    return ray.data.read_parquet(
        [storage.resolve(p)[1] for p in paths], filesystem=fs, file_extensions=["parquet"]
    )


def _messages_column(table: pa.Table) -> list[list[dict[str, Any]]]:
    col = table.column("messages").to_pylist()
    return [json.loads(m) if isinstance(m, str) else list(m) for m in col]


class EncodeBatch:
    """The encoder over a pyarrow batch (use it through :func:`encode_rows`): adds ``input_ids``/``labels`` (``list<int32>``), ``n_tokens`` (int32),
    ``truncated`` (bool) and ``full_tokens`` (int32, the length before truncation) to every batch, keeping all other columns. The tokenizer is loaded once per instance.
    """

    def __init__(self, tokenizer_dir: str, spec: Mapping[str, Any] | EncodingSpec | None = None):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(storage.local_copy(tokenizer_dir))
        self.encoder = ChatEncoder(self.tokenizer, EncodingSpec.from_dict(spec))

    def __call__(self, batch: pa.Table | Mapping[str, Any]) -> pa.Table:
        table = batch if isinstance(batch, pa.Table) else _to_table(batch)
        encoded = self.encoder.encode_many(_messages_column(table))
        new = {
            "input_ids": pa.array([e.input_ids for e in encoded], type=ENCODED_TYPES["input_ids"]),
            "labels": pa.array([e.labels for e in encoded], type=ENCODED_TYPES["labels"]),
            "n_tokens": pa.array([e.n_tokens for e in encoded], type=ENCODED_TYPES["n_tokens"]),
            "truncated": pa.array([e.truncated for e in encoded], type=ENCODED_TYPES["truncated"]),
            "full_tokens": pa.array([e.full_tokens for e in encoded], type=ENCODED_TYPES["full_tokens"]),
        }
        for name, arr in new.items():
            idx = table.schema.get_field_index(name)
            table = table.set_column(idx, name, arr) if idx >= 0 else table.append_column(name, arr)
        return table


@functools.lru_cache(maxsize=4)
def _encoder(tokenizer_dir: str, spec_json: str) -> EncodeBatch:
    return EncodeBatch(tokenizer_dir, json.loads(spec_json))


def cached_encoder(tokenizer_dir: str | os.PathLike, spec: Mapping[str, Any]) -> EncodeBatch:
    """This process's :class:`EncodeBatch` for ``(tokenizer_dir, spec)``: a Ray worker loads the tokenizer
    once however many batches (and runs) it encodes."""
    return _encoder(str(tokenizer_dir), json.dumps(dict(spec), sort_keys=True))


def encode_rows(
    batch: pa.Table,
    *,
    tokenizer_dir: str | os.PathLike,
    spec: Mapping[str, Any],
    columns: Sequence[str] | None = None,
    keep: Callable[[str], bool] | None = None,
) -> pa.Table:
    """``map_batches`` task (``batch_format="pyarrow"``): THE encoder over ``batch``.

    ``keep``: rows whose ``id`` it rejects are dropped before encoding (warmup's hold-out); ``columns``:
    the output columns (default: every input column plus the encoder's)."""
    table = batch if isinstance(batch, pa.Table) else _to_table(batch)
    if keep is not None:
        table = table.filter(pa.array([keep(str(i)) for i in table.column("id").to_pylist()], pa.bool_()))
    if table.num_rows == 0 and columns is not None:
        return pa.table({c: pa.array([], ENCODED_TYPES[c]) for c in columns})
    encoded = cached_encoder(tokenizer_dir, spec)(table)
    return encoded.select(list(columns)) if columns is not None else encoded


def _to_table(batch: Mapping[str, Any]) -> pa.Table:
    cols = {}
    for k, v in batch.items():
        cols[k] = v.tolist() if hasattr(v, "tolist") else list(v)
    return pa.table(cols)
