"""Router data: the per-sample quality scores and routing features that scoring writes and selection reads.

One Parquet shard per ingested pool shard (``<dir>/shards/<name>.parquet``) so scoring is idempotent
per shard. Row groups hold at least :data:`ROW_GROUP_ROWS` rows (or ~64 MB): reading a feature column back
costs one read per row group, so tiny groups made reading slower than the clustering. Only ``id`` and
``dataset`` are dictionary-encoded (routing probabilities do not repeat: a dictionary only adds bytes).

Selection never holds the whole ``[N, F]`` feature matrix: it reads the small columns
(:func:`read_columns`), a seeded sample of feature rows (:func:`read_feature_rows`) and streams the rest
shard by shard (:func:`iter_feature_blocks`). :func:`load_router_data` materialises everything for small
pools (tests, the report's small tables). Gate, routing and hidden columns are optional: a scorer without
a gate or a router has no such column (never a fake one).
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
# Cheap text signals of the answer, from the tokens the score stage encodes (scoring/text_signals.py).
TEXT_COLUMNS = ("rep_ratio", "char_rep_ratio", "copy_ratio", "answer_tokens")
# int64, null without a question: a key of the question side of the conversation (data/records.py
# prompt_key), equal for rows that ask the same thing (select.one_answer_per_prompt).
PROMPT_KEY = "prompt_key"
# Feature columns select can cluster on (fixed_size_list<float16>); see select.features.
FEATURE_COLUMNS = ("routing", "hidden")
# A row group is written once this many rows (or ROW_GROUP_BYTES of features) are buffered.
ROW_GROUP_ROWS = 16384
ROW_GROUP_BYTES = 64 << 20


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
        (PROMPT_KEY, pa.int64()),
        *([("quality_layers", pa.list_(pa.float32(), num_layers))] if gate else []),
        *([("routing", pa.list_(pa.float16(), num_layers * num_experts))] if num_experts else []),
        *([("hidden", pa.list_(pa.float16(), hidden_dim))] if hidden_dim else []),
    ]
    meta = {META_LAYERS: str(num_layers).encode(), META_EXPERTS: str(num_experts).encode()}
    if hidden_dim:
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
        self._writer = pq.ParquetWriter(
            self._tmp, self.schema, compression="zstd", use_dictionary=["id", "dataset"]
        )
        self._row_bytes = 2 * (num_layers * num_experts + hidden_dim) + 4 * num_layers + 64
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self.rows = 0

    def write_batch(self, columns: Mapping[str, Any]) -> None:
        """``columns``: id, dataset (lists of str), n_tokens [B], truncated [B], full_tokens [B] (optional,
        default n_tokens); with a gate quality [B] and quality_layers [B, L]; for an MoE routing [B, L*E]
        or [B, L, E]; with ``hidden_dim`` hidden [B, D] (all float); optional :data:`NLL_COLUMNS` and
        :data:`TEXT_COLUMNS` [B] (float, NaN when absent: not computed) and :data:`PROMPT_KEY` [B] (int or None,
        all None when absent). float16 features are stored as they are; rows are buffered
        into row groups of :data:`ROW_GROUP_ROWS` rows (or :data:`ROW_GROUP_BYTES`)."""
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
        key = columns.get(PROMPT_KEY)
        try:  # Arrow's safe cast: a fractional float key raises instead of truncating
            keys = key if key is None or isinstance(key, pa.Array) else pa.array(key)
            data[PROMPT_KEY] = pa.nulls(n, pa.int64()) if keys is None else keys.cast(pa.int64())
        except pa.ArrowInvalid as e:
            raise ValueError(f"{PROMPT_KEY}: 64-bit integer hashes or None, got a float ({e})") from None
        if self.gate:
            data["quality"] = pa.array(np.asarray(columns["quality"], dtype=np.float32))
            layers = np.asarray(columns["quality_layers"], dtype=np.float32).reshape(n, self.num_layers)
            data["quality_layers"] = _fixed(layers, pa.float32())
        if self.num_experts:
            routing = _fp16(columns["routing"], n, self.num_layers * self.num_experts)
            if routing.shape[1] != self.num_layers * self.num_experts:
                raise ValueError(
                    f"routing has {routing.shape[1]} features per sample, expected "
                    f"{self.num_layers}x{self.num_experts}={self.num_layers * self.num_experts}"
                )
            data["routing"] = _fixed(routing, pa.float16())
        if self.hidden_dim:
            hidden = _fp16(columns["hidden"], n, self.hidden_dim)
            if hidden.shape[1] != self.hidden_dim:
                raise ValueError(
                    f"hidden has {hidden.shape[1]} features per sample, expected {self.hidden_dim}"
                )
            data["hidden"] = _fixed(hidden, pa.float16())
        self._pending.append(pa.table(data, schema=self.schema))
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
    routing: (
        np.ndarray | None
    )  # float16 [N, L*E] (load_router_data(..., features=True); None: a dense scorer)
    n_tokens: np.ndarray  # int32 [N]
    truncated: np.ndarray  # bool [N]
    num_layers: int
    num_experts: int
    shards: list[Path]
    hidden: np.ndarray | None = None  # float16 [N, D] (same; None: score.hidden off)
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


SMALL_COLUMNS = ("id", "dataset", "n_tokens", "truncated", *NLL_COLUMNS)
GATE_COLUMNS = ("quality", "quality_layers")


def read_columns(shards: Sequence[Path], columns: Sequence[str]) -> pa.Table:
    """``columns`` of every shard, concatenated in shard order (features are never among them here)."""
    return pa.concat_tables([pq.read_table(p, columns=list(columns)) for p in shards])


def load_router_data(directory: str | os.PathLike, *, features: bool = False) -> RouterData:
    """The small columns as numpy/lists; ``features=True`` also reads the float16 feature matrices
    (``routing``, ``hidden``) into memory (small pools only: selection streams them instead)."""
    shards = shard_paths(directory)
    if not shards:
        raise FileNotFoundError(f"no router-data shards under {Path(directory) / SHARD_DIR}")
    num_layers, num_experts, hidden_dim, names = _shape_of(shards)
    gate = "quality" in names
    cols = [*SMALL_COLUMNS, *(c for c in TEXT_COLUMNS if c in names), *(GATE_COLUMNS if gate else ())]
    small = read_columns(shards, cols)
    n = small.num_rows
    quality_layers = None
    if gate:
        quality_layers = (
            small.column("quality_layers").combine_chunks().flatten().to_numpy().reshape(n, num_layers)
            if n
            else np.zeros((0, num_layers), np.float32)
        ).astype(np.float32, copy=False)

    def matrix(column: str, width: int) -> np.ndarray | None:
        if not (features and width):
            return None
        blocks = [b for _, b in iter_feature_blocks(shards, column)]
        return np.concatenate(blocks) if blocks else np.zeros((0, width), np.float16)

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
        routing=matrix("routing", num_layers * num_experts),
        n_tokens=small.column("n_tokens").to_numpy(),
        truncated=small.column("truncated").to_numpy(zero_copy_only=False),
        num_layers=num_layers,
        num_experts=num_experts,
        shards=shards,
        hidden=matrix("hidden", hidden_dim),
        hidden_dim=hidden_dim,
        **{c: f32(c) for c in TEXT_COLUMNS},
    )


def router_shape(shards: Sequence[Path]) -> tuple[int, int]:
    """(layers, experts) every shard agrees on (experts 0: a dense scorer, no routing column)."""
    layers, experts, _, _ = _shape_of(shards)
    return layers, experts


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
