"""Router data: the per-sample quality scores and routing features that scoring writes and selection reads.

One Parquet shard per ingested pool shard (``<dir>/shards/<name>.parquet``) so scoring is idempotent
per shard. :func:`load_router_data` gives selection a memory-mapped ``float16 [N, L*E]`` routing matrix:
it is materialised once into ``<dir>/_cache/routing.f16.npy`` by streaming row groups (never the whole
table in RAM) and keyed by the shards' fingerprints, so a rescored shard invalidates it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SHARD_DIR = "shards"
CACHE_DIR = "_cache"
META_LAYERS = b"selectmoe.num_layers"
META_EXPERTS = b"selectmoe.num_experts"
# The base model's perplexity anchors, from the score stage's forward pass (ifd: its optional extra pass).
NLL_COLUMNS = ("response_nll", "sample_nll", "ifd")


def router_schema(num_layers: int, num_experts: int) -> pa.Schema:
    """The one router-data schema (see docs/architecture.md)."""
    return pa.schema(
        [
            ("id", pa.string()),
            ("dataset", pa.string()),
            ("n_tokens", pa.int32()),
            ("truncated", pa.bool_()),
            ("full_tokens", pa.int32()),  # length before truncation: what max_length would keep it whole
            ("quality", pa.float32()),
            ("response_nll", pa.float32()),
            ("sample_nll", pa.float32()),
            ("ifd", pa.float32()),
            ("quality_layers", pa.list_(pa.float32(), num_layers)),
            ("routing", pa.list_(pa.float16(), num_layers * num_experts)),
        ],
        metadata={META_LAYERS: str(num_layers).encode(), META_EXPERTS: str(num_experts).encode()},
    )


class RouterDataWriter:
    """Streams batches of per-sample router statistics into one Parquet shard.

    Writes to ``<name>.parquet.tmp`` and renames on :meth:`close`, so a shard file exists only when it is
    complete; a killed scorer leaves no half shard behind to be mistaken for output.
    """

    def __init__(self, directory: str | os.PathLike, shard_name: str, num_layers: int, num_experts: int):
        self.num_layers, self.num_experts = num_layers, num_experts
        self.schema = router_schema(num_layers, num_experts)
        shard_dir = Path(directory) / SHARD_DIR
        shard_dir.mkdir(parents=True, exist_ok=True)
        self.path = shard_dir / f"{shard_name}.parquet"
        self._tmp = self.path.with_suffix(".parquet.tmp")
        self._writer = pq.ParquetWriter(self._tmp, self.schema, compression="zstd")
        self.rows = 0

    def write_batch(self, columns: Mapping[str, Any]) -> None:
        """``columns``: id, dataset (lists of str), n_tokens [B], truncated [B], full_tokens [B] (optional,
        default n_tokens), quality [B] (float),
        quality_layers [B, L] (float), routing [B, L*E] or [B, L, E] (float); optional
        :data:`NLL_COLUMNS` [B] (float, NaN when absent: not computed)."""
        n = len(columns["id"])
        if n == 0:
            return
        quality_layers = np.asarray(columns["quality_layers"], dtype=np.float32).reshape(n, self.num_layers)
        routing = np.asarray(columns["routing"], dtype=np.float32).reshape(n, -1).astype(np.float16)
        if routing.shape[1] != self.num_layers * self.num_experts:
            raise ValueError(
                f"routing has {routing.shape[1]} features per sample, expected "
                f"{self.num_layers}x{self.num_experts}={self.num_layers * self.num_experts}"
            )
        table = pa.table(
            {
                "id": pa.array([str(x) for x in columns["id"]], pa.string()),
                "dataset": pa.array([str(x) for x in columns["dataset"]], pa.string()),
                "n_tokens": pa.array(np.asarray(columns["n_tokens"], dtype=np.int32)),
                "truncated": pa.array(np.asarray(columns["truncated"], dtype=bool)),
                "full_tokens": pa.array(
                    np.asarray(columns.get("full_tokens", columns["n_tokens"]), dtype=np.int32)
                ),
                "quality": pa.array(np.asarray(columns["quality"], dtype=np.float32)),
                **{
                    c: pa.array(np.asarray(columns.get(c, np.full(n, np.nan)), dtype=np.float32))
                    for c in NLL_COLUMNS
                },
                "quality_layers": pa.FixedSizeListArray.from_arrays(
                    pa.array(quality_layers.reshape(-1)), self.num_layers
                ),
                "routing": pa.FixedSizeListArray.from_arrays(
                    pa.array(routing.reshape(-1), pa.float16()), self.num_layers * self.num_experts
                ),
            },
            schema=self.schema,
        )
        self._writer.write_table(table)
        self.rows += n

    def close(self) -> Path:
        self._writer.close()
        self._tmp.replace(self.path)
        return self.path

    def abort(self) -> None:
        self._writer.close()
        self._tmp.unlink(missing_ok=True)


@dataclass
class RouterData:
    """Everything selection needs, in the order of the sorted shard files."""

    ids: list[str]
    datasets: list[str]
    quality: np.ndarray  # float32 [N], the gate score
    response_nll: np.ndarray  # float32 [N], mean NLL of the assistant tokens (NaN: none in the window)
    sample_nll: np.ndarray  # float32 [N], mean NLL of the whole sample
    ifd: np.ndarray  # float32 [N], L(A|Q)/L(A) (NaN unless score.ifd)
    quality_layers: np.ndarray  # float32 [N, L]
    routing: np.ndarray  # float16 [N, L*E], memory-mapped
    n_tokens: np.ndarray  # int32 [N]
    truncated: np.ndarray  # bool [N]
    num_layers: int
    num_experts: int
    shards: list[Path]

    def __len__(self) -> int:
        return len(self.ids)


def shard_paths(directory: str | os.PathLike) -> list[Path]:
    return sorted((Path(directory) / SHARD_DIR).glob("*.parquet"))


def load_router_data(directory: str | os.PathLike, *, mmap: bool = True) -> RouterData:
    """Load router data; ``routing`` is a read-only memmap unless ``mmap=False``."""
    shards = shard_paths(directory)
    if not shards:
        raise FileNotFoundError(f"no router-data shards under {Path(directory) / SHARD_DIR}")
    num_layers, num_experts = _shape_of(shards)
    small_cols = ["id", "dataset", "n_tokens", "truncated", "quality", *NLL_COLUMNS, "quality_layers"]
    small = pa.concat_tables([pq.read_table(p, columns=small_cols) for p in shards])
    n = small.num_rows
    routing = _routing_matrix(Path(directory), shards, n, num_layers * num_experts, mmap=mmap)
    quality_layers = (
        small.column("quality_layers").combine_chunks().flatten().to_numpy().reshape(n, num_layers)
        if n
        else np.zeros((0, num_layers), np.float32)
    )
    return RouterData(
        ids=small.column("id").to_pylist(),
        datasets=small.column("dataset").to_pylist(),
        quality=small.column("quality").to_numpy().astype(np.float32, copy=False),
        **{c: small.column(c).to_numpy().astype(np.float32, copy=False) for c in NLL_COLUMNS},
        quality_layers=quality_layers.astype(np.float32, copy=False),
        routing=routing,
        n_tokens=small.column("n_tokens").to_numpy(),
        truncated=small.column("truncated").to_numpy(zero_copy_only=False),
        num_layers=num_layers,
        num_experts=num_experts,
        shards=shards,
    )


def _shape_of(shards: list[Path]) -> tuple[int, int]:
    shapes = set()
    for p in shards:
        schema = pq.read_schema(p)
        meta = schema.metadata or {}
        if META_LAYERS not in meta or META_EXPERTS not in meta:
            raise ValueError(f"{p} is not a selectmoe router-data shard (schema metadata missing)")
        missing = [c for c in NLL_COLUMNS if c not in schema.names]
        if missing:
            raise ValueError(
                f"{p}: router-data shard of an older format lacks {missing}; rerun the score stage"
            )
        shapes.add((int(meta[META_LAYERS]), int(meta[META_EXPERTS])))
    if len(shapes) != 1:
        raise ValueError(f"router-data shards disagree on (layers, experts): {sorted(shapes)}")
    return shapes.pop()


def _routing_matrix(directory: Path, shards: list[Path], n: int, width: int, *, mmap: bool) -> np.ndarray:
    key = hashlib.sha256(
        json.dumps([[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in shards]).encode()
    ).hexdigest()[:16]
    cache = directory / CACHE_DIR / f"routing-{key}.f16.npy"
    if mmap and cache.is_file():
        return np.load(cache, mmap_mode="r")
    if mmap:
        cache.parent.mkdir(parents=True, exist_ok=True)
        for stale in cache.parent.glob("routing-*.f16.npy"):
            stale.unlink()
        tmp = cache.with_suffix(".tmp.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, width))
    else:
        out = np.empty((n, width), dtype=np.float16)
    row = 0
    for p in shards:
        reader = pq.ParquetFile(p)
        for group in range(reader.num_row_groups):
            col = reader.read_row_group(group, columns=["routing"]).column("routing").combine_chunks()
            values = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
            out[row : row + len(values)] = values
            row += len(values)
    if row != n:
        raise RuntimeError(f"router data changed while loading ({row} routing rows vs {n} ids)")
    if not mmap:
        return out
    out.flush()
    del out
    os.replace(tmp, cache)
    return np.load(cache, mmap_mode="r")
