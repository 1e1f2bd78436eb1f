"""Router data: the per-sample quality scores and routing features that scoring writes and selection reads.

One Parquet shard per ingested pool shard (``<dir>/shards/<name>.parquet``) so scoring is idempotent
per shard. Row groups hold at least :data:`ROW_GROUP_ROWS` rows (or ~64 MB): reading a feature column back
costs one read per row group, so tiny groups made reading slower than the clustering. Only ``id`` and
``dataset`` are dictionary-encoded (routing probabilities do not repeat: a dictionary only adds bytes).

Selection never holds the whole ``[N, F]`` feature matrix: it reads the small columns
(:func:`read_columns`), a seeded sample of feature rows (:func:`read_feature_rows`) and streams the rest
shard by shard (:func:`iter_feature_blocks`). :func:`load_router_data` materialises everything for small
pools (tests, the report's small tables).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SHARD_DIR = "shards"
META_LAYERS = b"selectmoe.num_layers"
META_EXPERTS = b"selectmoe.num_experts"
META_HIDDEN = b"selectmoe.hidden_dim"
# The base model's perplexity anchors, from the score stage's forward pass (ifd: its optional extra pass).
NLL_COLUMNS = ("response_nll", "sample_nll", "ifd")
# Feature columns select can cluster on (fixed_size_list<float16>); see select.features.
FEATURE_COLUMNS = ("routing", "hidden")
# A row group is written once this many rows (or ROW_GROUP_BYTES of features) are buffered.
ROW_GROUP_ROWS = 16384
ROW_GROUP_BYTES = 64 << 20


def router_schema(num_layers: int, num_experts: int, *, hidden_dim: int = 0) -> pa.Schema:
    """The one router-data schema (see docs/architecture.md); ``hidden`` only when ``hidden_dim > 0``."""
    fields = [
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
    ]
    meta = {META_LAYERS: str(num_layers).encode(), META_EXPERTS: str(num_experts).encode()}
    if hidden_dim:
        fields.append(("hidden", pa.list_(pa.float16(), hidden_dim)))
        meta[META_HIDDEN] = str(hidden_dim).encode()
    return pa.schema(fields, metadata=meta)


def _fp16(values: Any, n: int, width: int) -> np.ndarray:
    """[B, width] float16 without a float32 round trip when the values already are float16."""
    arr = np.asarray(values)
    if arr.dtype != np.float16:
        arr = np.asarray(arr, dtype=np.float32).astype(np.float16)
    return arr.reshape(n, -1)


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
        hidden_dim: int = 0,
    ):
        self.num_layers, self.num_experts, self.hidden_dim = num_layers, num_experts, hidden_dim
        self.schema = router_schema(num_layers, num_experts, hidden_dim=hidden_dim)
        shard_dir = Path(directory) / SHARD_DIR
        shard_dir.mkdir(parents=True, exist_ok=True)
        self.path = shard_dir / f"{shard_name}.parquet"
        self._tmp = self.path.with_suffix(".parquet.tmp")
        self._writer = pq.ParquetWriter(
            self._tmp, self.schema, compression="zstd", use_dictionary=["id", "dataset"]
        )
        self._row_bytes = 2 * (num_layers * num_experts + hidden_dim) + 4 * num_layers + 64
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self.rows = 0

    def write_batch(self, columns: Mapping[str, Any]) -> None:
        """``columns``: id, dataset (lists of str), n_tokens [B], truncated [B], full_tokens [B] (optional,
        default n_tokens), quality [B] (float),
        quality_layers [B, L] (float), routing [B, L*E] or [B, L, E] (float; float16 is stored as is);
        optional :data:`NLL_COLUMNS` [B] (float, NaN when absent: not computed); ``hidden`` [B, D] when
        the writer was made with ``hidden_dim=D``. Rows are buffered into row groups of
        :data:`ROW_GROUP_ROWS` rows (or :data:`ROW_GROUP_BYTES`)."""
        n = len(columns["id"])
        if n == 0:
            return
        quality_layers = np.asarray(columns["quality_layers"], dtype=np.float32).reshape(n, self.num_layers)
        routing = _fp16(columns["routing"], n, self.num_layers * self.num_experts)
        if routing.shape[1] != self.num_layers * self.num_experts:
            raise ValueError(
                f"routing has {routing.shape[1]} features per sample, expected "
                f"{self.num_layers}x{self.num_experts}={self.num_layers * self.num_experts}"
            )
        extra = {}
        if self.hidden_dim:
            hidden = _fp16(columns["hidden"], n, self.hidden_dim)
            if hidden.shape[1] != self.hidden_dim:
                raise ValueError(
                    f"hidden has {hidden.shape[1]} values per sample, expected {self.hidden_dim}"
                )
            extra["hidden"] = pa.FixedSizeListArray.from_arrays(pa.array(hidden.reshape(-1)), self.hidden_dim)
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
                    pa.array(routing.reshape(-1)), self.num_layers * self.num_experts
                ),
                **extra,
            },
            schema=self.schema,
        )
        self._pending.append(table)
        self._pending_rows += n
        self.rows += n
        if self._pending_rows >= min(ROW_GROUP_ROWS, max(1, ROW_GROUP_BYTES // self._row_bytes)):
            self._flush()

    def _flush(self) -> None:
        if self._pending_rows:
            self._writer.write_table(pa.concat_tables(self._pending), row_group_size=self._pending_rows)
        self._pending, self._pending_rows = [], 0

    def close(self) -> Path:
        self._flush()
        self._writer.close()
        self._tmp.replace(self.path)
        return self.path

    def abort(self) -> None:
        self._writer.close()
        self._tmp.unlink(missing_ok=True)


@dataclass
class RouterData:
    """The small columns of router data (and, on request, the routing matrix), in sorted-shard order."""

    ids: list[str]
    datasets: list[str]
    quality: np.ndarray  # float32 [N], the gate score
    response_nll: np.ndarray  # float32 [N], mean NLL of the assistant tokens (NaN: none in the window)
    sample_nll: np.ndarray  # float32 [N], mean NLL of the whole sample
    ifd: np.ndarray  # float32 [N], L(A|Q)/L(A) (NaN unless score.ifd)
    quality_layers: np.ndarray  # float32 [N, L]
    routing: np.ndarray | None  # float16 [N, L*E] (only with load_router_data(..., routing=True))
    n_tokens: np.ndarray  # int32 [N]
    truncated: np.ndarray  # bool [N]
    num_layers: int
    num_experts: int
    shards: list[Path]

    def __len__(self) -> int:
        return len(self.ids)


def shard_paths(directory: str | os.PathLike) -> list[Path]:
    return sorted((Path(directory) / SHARD_DIR).glob("*.parquet"))


SMALL_COLUMNS = ("id", "dataset", "n_tokens", "truncated", "quality", *NLL_COLUMNS, "quality_layers")


def read_columns(shards: Sequence[Path], columns: Sequence[str]) -> pa.Table:
    """``columns`` of every shard, concatenated in shard order (features are never among them here)."""
    return pa.concat_tables([pq.read_table(p, columns=list(columns)) for p in shards])


def load_router_data(directory: str | os.PathLike, *, routing: bool = False) -> RouterData:
    """The small columns as numpy/lists; ``routing=True`` also reads the float16 routing matrix into
    memory (small pools only: selection streams it instead)."""
    shards = shard_paths(directory)
    if not shards:
        raise FileNotFoundError(f"no router-data shards under {Path(directory) / SHARD_DIR}")
    num_layers, num_experts = router_shape(shards)
    small = read_columns(shards, SMALL_COLUMNS)
    n = small.num_rows
    quality_layers = (
        small.column("quality_layers").combine_chunks().flatten().to_numpy().reshape(n, num_layers)
        if n
        else np.zeros((0, num_layers), np.float32)
    )
    matrix = None
    if routing:
        blocks = [b for _, b in iter_feature_blocks(shards, "routing")]
        matrix = np.concatenate(blocks) if blocks else np.zeros((0, num_layers * num_experts), np.float16)
    return RouterData(
        ids=small.column("id").to_pylist(),
        datasets=small.column("dataset").to_pylist(),
        quality=small.column("quality").to_numpy().astype(np.float32, copy=False),
        **{c: small.column(c).to_numpy().astype(np.float32, copy=False) for c in NLL_COLUMNS},
        quality_layers=quality_layers.astype(np.float32, copy=False),
        routing=matrix,
        n_tokens=small.column("n_tokens").to_numpy(),
        truncated=small.column("truncated").to_numpy(zero_copy_only=False),
        num_layers=num_layers,
        num_experts=num_experts,
        shards=shards,
    )


def router_shape(shards: Sequence[Path]) -> tuple[int, int]:
    """(layers, experts) every shard agrees on; a shard without the metadata or the NLL columns fails."""
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


def feature_widths(shards: Sequence[Path]) -> dict[str, int]:
    """``{column: width}`` of the feature columns present in every shard (a column some shards lack is
    not offered: selection needs it for every row)."""
    common: dict[str, int] | None = None
    for p in shards:
        schema = pq.read_schema(p)
        here = {c: schema.field(c).type.list_size for c in FEATURE_COLUMNS if c in schema.names}
        common = here if common is None else {c: w for c, w in common.items() if here.get(c) == w}
    return common or {}


def _fixed_to_numpy(col: pa.ChunkedArray | pa.Array, width: int) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)


def iter_feature_blocks(
    shards: Sequence[Path], columns: str | Sequence[str]
) -> Iterator[tuple[int, np.ndarray]]:
    """``(shard index, float16 [rows, F])`` row group by row group, the ``columns`` side by side."""
    columns = [columns] if isinstance(columns, str) else list(columns)
    for si, p in enumerate(shards):
        pf = pq.ParquetFile(p)
        for g in range(pf.num_row_groups):
            t = pf.read_row_group(g, columns=columns)
            parts = [_fixed_to_numpy(t.column(c), t.schema.field(c).type.list_size) for c in columns]
            yield si, parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def read_feature_rows(
    shard: Path, rows: np.ndarray, columns: Sequence[str], widths: Mapping[str, int]
) -> np.ndarray:
    """float16 ``[len(rows), F]`` of the given (sorted) rows of one shard: only the row groups that hold
    one of them are read, one at a time."""
    pf = pq.ParquetFile(shard)
    out = np.empty((len(rows), sum(widths[c] for c in columns)), np.float16)
    start = 0
    done = 0
    for g in range(pf.num_row_groups):
        size = pf.metadata.row_group(g).num_rows
        lo, hi = np.searchsorted(rows, [start, start + size])
        if hi > lo:
            t = pf.read_row_group(g, columns=list(columns))
            local = pa.array(rows[lo:hi] - start)
            parts = [_fixed_to_numpy(t.column(c).take(local), widths[c]) for c in columns]
            out[done : done + hi - lo] = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
            done += hi - lo
        start += size
    if done != len(rows):
        raise ValueError(f"{shard}: asked for {len(rows)} rows, found {done}")
    return out
