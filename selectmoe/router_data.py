"""Router data: the per-sample quality scores and routing features that scoring writes and selection reads.

One Parquet shard per ingested pool shard (``<dir>/shards/<name>.parquet``) so scoring is idempotent
per shard. :func:`load_router_data` gives selection memory-mapped ``float16`` feature matrices (``routing
[N, L*E]`` of an MoE scorer, ``hidden [N, D]`` with ``score.hidden``): each is materialised once into
``<dir>/_cache/<column>-<key>.f16.npy`` by streaming row groups (never the whole table in RAM), keyed by
the shards' fingerprints, so a rescored shard invalidates it. Gate, routing and hidden columns are
optional: a scorer without a gate or a router has no such column (never a fake one).
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
META_HIDDEN = b"selectmoe.hidden_dim"
# The base model's perplexity anchors, from the score stage's forward pass (ifd: its optional extra pass).
NLL_COLUMNS = ("response_nll", "sample_nll", "ifd")
# Cheap text signals of the answer, from the tokens the score stage encodes (scoring/text_signals.py).
TEXT_COLUMNS = ("rep_ratio", "char_rep_ratio", "copy_ratio", "answer_tokens")


def router_schema(num_layers: int, num_experts: int, *, gate: bool = True, hidden_dim: int = 0) -> pa.Schema:
    """The one router-data schema (see docs/architecture.md). Optional blocks: ``quality`` +
    ``quality_layers`` only for a scorer with a gate (``gate``), ``routing`` only for an MoE
    (``num_experts > 0``), ``hidden`` only with ``hidden_dim > 0`` (``score.hidden``)."""
    fields = [
        ("id", pa.string()),
        ("dataset", pa.string()),
        ("n_tokens", pa.int32()),
        ("truncated", pa.bool_()),
        ("full_tokens", pa.int32()),  # length before truncation: what max_length would keep it whole
        *([("quality", pa.float32())] if gate else []),
        ("response_nll", pa.float32()),
        ("sample_nll", pa.float32()),
        ("ifd", pa.float32()),
        *((c, pa.float32()) for c in TEXT_COLUMNS),
        *([("quality_layers", pa.list_(pa.float32(), num_layers))] if gate else []),
        *([("routing", pa.list_(pa.float16(), num_layers * num_experts))] if num_experts else []),
        *([("hidden", pa.list_(pa.float16(), hidden_dim))] if hidden_dim else []),
    ]
    meta = {META_LAYERS: str(num_layers).encode(), META_EXPERTS: str(num_experts).encode()}
    if hidden_dim:
        meta[META_HIDDEN] = str(hidden_dim).encode()
    return pa.schema(fields, metadata=meta)


class RouterDataWriter:
    """Streams batches of per-sample router statistics into one Parquet shard.

    Writes to ``<name>.parquet.tmp`` and renames on :meth:`close`, so a shard file exists only when it is
    complete; a killed scorer leaves no half shard behind to be mistaken for output.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        shard_name: str,
        num_layers: int,
        num_experts: int,
        *,
        gate: bool = True,
        hidden_dim: int = 0,
    ):
        self.num_layers, self.num_experts = num_layers, num_experts
        self.gate, self.hidden_dim = gate, int(hidden_dim)
        self.schema = router_schema(num_layers, num_experts, gate=gate, hidden_dim=self.hidden_dim)
        shard_dir = Path(directory) / SHARD_DIR
        shard_dir.mkdir(parents=True, exist_ok=True)
        self.path = shard_dir / f"{shard_name}.parquet"
        self._tmp = self.path.with_suffix(".parquet.tmp")
        self._writer = pq.ParquetWriter(self._tmp, self.schema, compression="zstd")
        self.rows = 0

    def write_batch(self, columns: Mapping[str, Any]) -> None:
        """``columns``: id, dataset (lists of str), n_tokens [B], truncated [B], full_tokens [B] (optional,
        default n_tokens); with a gate quality [B] and quality_layers [B, L]; for an MoE routing [B, L*E]
        or [B, L, E]; with ``hidden_dim`` hidden [B, D] (all float); optional :data:`NLL_COLUMNS` and
        :data:`TEXT_COLUMNS` [B] (float, NaN when absent: not computed)."""
        n = len(columns["id"])
        if n == 0:
            return
        data = {
            "id": pa.array([str(x) for x in columns["id"]], pa.string()),
            "dataset": pa.array([str(x) for x in columns["dataset"]], pa.string()),
            "n_tokens": pa.array(np.asarray(columns["n_tokens"], dtype=np.int32)),
            "truncated": pa.array(np.asarray(columns["truncated"], dtype=bool)),
            "full_tokens": pa.array(
                np.asarray(columns.get("full_tokens", columns["n_tokens"]), dtype=np.int32)
            ),
            **{
                c: pa.array(np.asarray(columns.get(c, np.full(n, np.nan)), dtype=np.float32))
                for c in (*NLL_COLUMNS, *TEXT_COLUMNS)
            },
        }
        if self.gate:
            data["quality"] = pa.array(np.asarray(columns["quality"], dtype=np.float32))
            layers = np.asarray(columns["quality_layers"], dtype=np.float32).reshape(n, self.num_layers)
            data["quality_layers"] = _fixed(layers, pa.float32())
        if self.num_experts:
            routing = np.asarray(columns["routing"], dtype=np.float32).reshape(n, -1).astype(np.float16)
            if routing.shape[1] != self.num_layers * self.num_experts:
                raise ValueError(
                    f"routing has {routing.shape[1]} features per sample, expected "
                    f"{self.num_layers}x{self.num_experts}={self.num_layers * self.num_experts}"
                )
            data["routing"] = _fixed(routing, pa.float16())
        if self.hidden_dim:
            hidden = np.asarray(columns["hidden"], dtype=np.float16).reshape(n, -1)
            if hidden.shape[1] != self.hidden_dim:
                raise ValueError(
                    f"hidden has {hidden.shape[1]} features per sample, expected {self.hidden_dim}"
                )
            data["hidden"] = _fixed(hidden, pa.float16())
        self._writer.write_table(pa.table(data, schema=self.schema))
        self.rows += n

    def close(self) -> Path:
        self._writer.close()
        self._tmp.replace(self.path)
        return self.path

    def abort(self) -> None:
        self._writer.close()
        self._tmp.unlink(missing_ok=True)


def _fixed(values: np.ndarray, type_: pa.DataType) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type_), values.shape[1])


@dataclass
class RouterData:
    """Everything selection needs, in the order of the sorted shard files. The optional blocks are None
    when the scorer did not produce them (no gate, no router, ``score.hidden`` off)."""

    ids: list[str]
    datasets: list[str]
    quality: np.ndarray | None  # float32 [N], the gate score (None: the scorer has no gate)
    response_nll: np.ndarray  # float32 [N], mean NLL of the assistant tokens (NaN: none in the window)
    sample_nll: np.ndarray  # float32 [N], mean NLL of the whole sample
    ifd: np.ndarray  # float32 [N], L(A|Q)/L(A) (NaN unless score.ifd)
    quality_layers: np.ndarray | None  # float32 [N, L]
    routing: np.ndarray | None  # float16 [N, L*E], memory-mapped (None: a dense scorer)
    n_tokens: np.ndarray  # int32 [N]
    truncated: np.ndarray  # bool [N]
    num_layers: int
    num_experts: int
    shards: list[Path]
    hidden: np.ndarray | None = None  # float16 [N, D], memory-mapped (None: score.hidden off)
    hidden_dim: int = 0
    # text signals of the answer (TEXT_COLUMNS; NaN when the shards predate them)
    rep_ratio: np.ndarray | None = None
    char_rep_ratio: np.ndarray | None = None
    copy_ratio: np.ndarray | None = None
    answer_tokens: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def feature_columns(self) -> list[str]:
        """The feature blocks present: ``routing`` and/or ``hidden``."""
        return [c for c in ("routing", "hidden") if getattr(self, c) is not None]


def shard_paths(directory: str | os.PathLike) -> list[Path]:
    return sorted((Path(directory) / SHARD_DIR).glob("*.parquet"))


def load_router_data(directory: str | os.PathLike, *, mmap: bool = True) -> RouterData:
    """Load router data; ``routing`` and ``hidden`` are read-only memmaps unless ``mmap=False``."""
    shards = shard_paths(directory)
    if not shards:
        raise FileNotFoundError(f"no router-data shards under {Path(directory) / SHARD_DIR}")
    num_layers, num_experts, hidden_dim, names = _shape_of(shards)
    gate = "quality" in names
    small_cols = ["id", "dataset", "n_tokens", "truncated", *NLL_COLUMNS]
    small_cols += [c for c in TEXT_COLUMNS if c in names]
    small_cols += ["quality", "quality_layers"] if gate else []
    small = pa.concat_tables([pq.read_table(p, columns=small_cols) for p in shards])
    n = small.num_rows
    routing = (
        _feature_matrix(Path(directory), shards, n, num_layers * num_experts, "routing", mmap=mmap)
        if num_experts
        else None
    )
    hidden = (
        _feature_matrix(Path(directory), shards, n, hidden_dim, "hidden", mmap=mmap) if hidden_dim else None
    )
    quality_layers = None
    if gate:
        quality_layers = (
            small.column("quality_layers").combine_chunks().flatten().to_numpy().reshape(n, num_layers)
            if n
            else np.zeros((0, num_layers), np.float32)
        ).astype(np.float32, copy=False)

    def f32(c: str) -> np.ndarray:
        if c not in small.column_names:
            return np.full(n, np.nan, np.float32)
        return small.column(c).to_numpy().astype(np.float32, copy=False)

    return RouterData(
        ids=small.column("id").to_pylist(),
        datasets=small.column("dataset").to_pylist(),
        quality=f32("quality") if gate else None,
        **{c: f32(c) for c in NLL_COLUMNS},
        quality_layers=quality_layers,
        routing=routing,
        n_tokens=small.column("n_tokens").to_numpy(),
        truncated=small.column("truncated").to_numpy(zero_copy_only=False),
        num_layers=num_layers,
        num_experts=num_experts,
        shards=shards,
        hidden=hidden,
        hidden_dim=hidden_dim,
        **{c: f32(c) for c in TEXT_COLUMNS},
    )


def _shape_of(shards: list[Path]) -> tuple[int, int, int, list[str]]:
    """``(layers, experts, hidden_dim, column names)``, the same in every shard or an error naming them."""
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
        experts = int(meta[META_EXPERTS]) if "routing" in schema.names else 0
        shape = (int(meta[META_LAYERS]), experts, int(meta.get(META_HIDDEN, b"0")), "quality" in schema.names)
        shapes.add(shape)
        names = schema.names
    if len(shapes) != 1:
        raise ValueError(
            f"router-data shards disagree on (layers, experts, hidden_dim, gate): {sorted(shapes)}; "
            "rerun the score stage"
        )
    layers, experts, hidden_dim, _ = shapes.pop()
    return layers, experts, hidden_dim, names


def _feature_matrix(
    directory: Path, shards: list[Path], n: int, width: int, column: str, *, mmap: bool
) -> np.ndarray:
    """One fixed-size-list float16 column (``routing`` or ``hidden``) as an ``[N, width]`` matrix, streamed
    row group by row group into a memmap cache keyed by the shards' fingerprints."""
    key = hashlib.sha256(
        json.dumps([[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in shards]).encode()
    ).hexdigest()[:16]
    cache = directory / CACHE_DIR / f"{column}-{key}.f16.npy"
    if mmap and cache.is_file():
        return np.load(cache, mmap_mode="r")
    if mmap:
        cache.parent.mkdir(parents=True, exist_ok=True)
        for stale in cache.parent.glob(f"{column}-*.f16.npy"):
            stale.unlink()
        tmp = cache.with_suffix(".tmp.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, width))
    else:
        out = np.empty((n, width), dtype=np.float16)
    row = 0
    for p in shards:
        reader = pq.ParquetFile(p)
        for group in range(reader.num_row_groups):
            col = reader.read_row_group(group, columns=[column]).column(column).combine_chunks()
            values = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
            out[row : row + len(values)] = values
            row += len(values)
    if row != n:
        raise RuntimeError(f"router data changed while loading ({row} {column} rows vs {n} ids)")
    if not mmap:
        return out
    out.flush()
    del out
    os.replace(tmp, cache)
    return np.load(cache, mmap_mode="r")
