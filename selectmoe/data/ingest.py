"""Ingest: read the pool once, validate every row, quarantine the bad ones, write Parquet shards.

Output layout (``out_dir``)::

    shards/<NNNNN>-<source-stem>-<CCCCC>.parquet   one per input file (NNNNN = file index), chunked every
                                                   ``chunk_rows`` valid rows (CCCCC = chunk index);
                                                   sorted names = pool order
    rejected.jsonl     {"file", "line", "reason", "raw", "detail"} per rejected row
    flagged.jsonl      {"file", "line", "id", "reason": "over_long", "n_chars", "max_chars"} (rows kept)
    _manifest.json     stage "ingest": config, input fingerprints, counts (+ per-reason reject counts)

Shard columns: ``id``, ``dataset``, ``messages`` (canonical JSON string of the message list),
``source_file``, ``source_line``. Shards are written to a temporary directory and swapped in when the
whole pool is done, so a killed ingest never leaves a half-written pool. ``n_read == n_valid +
n_rejected`` always holds.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from selectmoe import storage
from selectmoe.data.readers import Source, expand_inputs, iter_rows
from selectmoe.data.records import (
    DUPLICATE_ID,
    FILE_REASONS,
    OVER_LONG,
    RecordError,
    canonical_messages,
    excerpt,
    n_chars,
    normalize,
    stable_id,
)
from selectmoe.manifest import fingerprint, manifest_matches, read_manifest, write_manifest

SHARDS_DIR = "shards"
REJECTED_NAME = "rejected.jsonl"
FLAGGED_NAME = "flagged.jsonl"
DEFAULT_MAX_CHARS = 100_000
DEFAULT_CHUNK_ROWS = 50_000
_WRITE_BATCH = 4096

logger = logging.getLogger(__name__)


@dataclass
class IngestResult:
    out_dir: str
    n_read: int = 0
    n_valid: int = 0
    n_rejected: int = 0
    n_flagged: int = 0
    shards: list[str] = field(default_factory=list)
    reject_reasons: dict[str, int] = field(default_factory=dict)
    n_files: int = 0
    skipped: bool = False  # True when an up-to-date ingest was reused
    wall_s: float = 0.0

    @property
    def rejected_path(self) -> str:
        return str(Path(self.out_dir) / REJECTED_NAME)

    def summary(self) -> dict[str, Any]:
        return {
            "n_files": self.n_files,
            "n_read": self.n_read,
            "n_valid": self.n_valid,
            "n_rejected": self.n_rejected,
            "n_flagged": self.n_flagged,
            "n_shards": len(self.shards),
            "reject_reasons": dict(sorted(self.reject_reasons.items())),
            "skipped": self.skipped,
            "wall_s": round(self.wall_s, 2),
        }

    def counts(self) -> dict[str, Any]:
        return {
            "n_files": self.n_files,
            "n_read": self.n_read,
            "n_valid": self.n_valid,
            "n_rejected": self.n_rejected,
            "n_flagged": self.n_flagged,
            "n_shards": len(self.shards),
            "reject_reasons": dict(sorted(self.reject_reasons.items())),
        }


@dataclass
class _Reject:
    file: str
    line: int
    reason: str
    raw: str
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "line": self.line,
            "reason": self.reason,
            "raw": self.raw,
            "detail": self.detail,
        }

    def message(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


class _ShardWriter:
    """Buffered Parquet writer for one input file, rolling to a new chunk every ``chunk_rows`` rows."""

    def __init__(self, tmp_dir: Path, file_index: int, stem: str, chunk_rows: int):
        self.tmp_dir, self.file_index, self.stem, self.chunk_rows = tmp_dir, file_index, stem, chunk_rows
        self.names: list[str] = []
        self._writer = None
        self._chunk = -1
        self._rows_in_chunk = 0
        self._buf: dict[str, list] = {
            k: [] for k in ("id", "dataset", "messages", "source_file", "source_line")
        }

    def add(self, rec: dict[str, Any], source_file: str, line: int) -> None:
        if self._writer is None or self._rows_in_chunk >= self.chunk_rows:
            self._flush()
            self._open_next()
        b = self._buf
        b["id"].append(rec["id"])
        b["dataset"].append(rec["dataset"])
        b["messages"].append(canonical_messages(rec["messages"]))
        b["source_file"].append(source_file)
        b["source_line"].append(line)
        self._rows_in_chunk += 1
        if len(b["id"]) >= _WRITE_BATCH:
            self._flush()

    def _open_next(self) -> None:
        import pyarrow.parquet as pq

        if self._writer is not None:
            self._writer.close()
        self._chunk += 1
        self._rows_in_chunk = 0
        name = f"{self.file_index:05d}-{self.stem}-{self._chunk:05d}.parquet"
        self.names.append(name)
        self._writer = pq.ParquetWriter(str(self.tmp_dir / name), SHARD_SCHEMA(), compression="zstd")

    def _flush(self) -> None:
        import pyarrow as pa

        if self._writer is None or not self._buf["id"]:
            return
        self._writer.write_table(pa.table(self._buf, schema=SHARD_SCHEMA()))
        self._buf = {k: [] for k in self._buf}

    def close(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def SHARD_SCHEMA():
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()),
            ("dataset", pa.string()),
            ("messages", pa.string()),
            ("source_file", pa.string()),
            ("source_line", pa.int64()),
        ]
    )


def _safe_stem(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("._") or "part"


def _config(inputs: Sequence[str], fmt: str, strict: bool, max_chars: int, chunk_rows: int) -> dict[str, Any]:
    return {
        "inputs": [str(p) for p in inputs],
        "format": fmt,
        "strict": bool(strict),
        "max_chars": int(max_chars),
        "chunk_rows": int(chunk_rows),
    }


def _as_list(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    if isinstance(inputs, (str, os.PathLike)):
        return [str(inputs)]
    return [str(p) for p in inputs]


def _validate_stream(
    sources: Sequence[Source],
    *,
    fmt: str,
    max_chars: int,
    on_reject,
    on_flag,
    strict: bool = False,
    progress: bool | None = False,
) -> Iterator[tuple[int, Source, int, dict[str, Any]]]:
    """Yield ``(file_index, source, line, record)`` for every valid row; report the rest via callbacks.

    An empty file, or one rejected as a whole (binary, unreadable), is also logged as a warning (an
    error when ``strict``), so a pool that quietly loses a file does not pass unnoticed. ``progress``
    shows a tqdm bar (rows/s) on stderr -- the CLI sets it.
    """
    seen: dict[str, tuple[str, int]] = {}
    disable = None if progress is None else not progress  # None: tqdm shows it on a terminal only
    bar = tqdm(desc="validate", unit=" rows", file=sys.stderr, disable=disable, mininterval=0.5)
    try:
        for fi, src in enumerate(sources):
            bar.set_postfix_str(src.name.rsplit("/", 1)[-1], refresh=False)
            n_rows = 0
            for row in iter_rows(src):
                n_rows += 1
                bar.update()
                rec = _check_row(src, row, fmt, on_reject)
                if rec is None:
                    continue
                first = seen.get(rec["id"])
                if first is not None:
                    on_reject(
                        _Reject(
                            src.name,
                            row.line,
                            DUPLICATE_ID,
                            row.raw or excerpt(row.obj),
                            f"id {rec['id']!r} first seen at {first[0]}:{first[1]}",
                        )
                    )
                    continue
                seen[rec["id"]] = (src.name, row.line)
                size = n_chars(rec["messages"])
                if size > max_chars:
                    on_flag(
                        {
                            "file": src.name,
                            "line": row.line,
                            "id": rec["id"],
                            "reason": OVER_LONG,
                            "n_chars": size,
                            "max_chars": max_chars,
                        }
                    )
                yield fi, src, row.line, rec
            if n_rows == 0:
                _warn_or_raise(f"pool file {src.name} is empty (no rows)", strict)
    finally:
        bar.close()


def _check_row(src: Source, row, fmt: str, on_reject) -> dict[str, Any] | None:
    """The normalised record with its id, or ``None`` after reporting the row as rejected."""
    if row.error is not None:
        reject = _Reject(src.name, row.line, row.error, row.raw, row.detail)
        on_reject(reject)  # raises first when strict
        if row.error in FILE_REASONS:
            logger.warning("pool file not read: %s", reject.message())
        return None
    try:
        rec = normalize(row.obj, fmt=fmt, default_dataset=src.dataset)
    except RecordError as exc:
        on_reject(_Reject(src.name, row.line, exc.reason, row.raw or excerpt(row.obj), exc.detail))
        return None
    if rec["id"] is None:
        rec["id"] = stable_id(rec["dataset"], rec["messages"])
    return rec


def _warn_or_raise(msg: str, strict: bool) -> None:
    if strict:
        raise ValueError(f"{msg} (data.strict=true)")
    logger.warning(msg)


class _Sink:
    """Collects counts and writes rejected/flagged JSONL; raises at the first reject when strict."""

    def __init__(self, rejected_path: Path, flagged_path: Path, strict: bool):
        self.strict = strict
        self.reasons: Counter[str] = Counter()
        self.n_rejected = 0
        self.n_flagged = 0
        self._rej = rejected_path.open("w", encoding="utf-8")
        self._flag = flagged_path.open("w", encoding="utf-8")

    def reject(self, r: _Reject) -> None:
        if self.strict:
            raise ValueError(f"invalid pool row: {r.message()}")
        self.n_rejected += 1
        self.reasons[r.reason] += 1
        self._rej.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")

    def flag(self, d: dict[str, Any]) -> None:
        self.n_flagged += 1
        self._flag.write(json.dumps(d, ensure_ascii=False) + "\n")

    def close(self) -> None:
        self._rej.close()
        self._flag.close()


def ingest_pool(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    fmt: str = "auto",
    strict: bool = False,
    max_chars: int = DEFAULT_MAX_CHARS,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: bool | None = None,
) -> IngestResult:
    """Validate ``inputs`` and write shards + rejected.jsonl + flagged.jsonl + _manifest.json to ``out_dir``.

    ``strict=True`` raises ``ValueError("invalid pool row: FILE:LINE: REASON (detail)")`` at the first bad
    row (or at an empty / skipped / unreadable file) and leaves ``out_dir`` untouched. ``progress``: a
    rows/s bar on stderr (``None``: only when stderr is a terminal).
    """
    inputs = _as_list(inputs)
    sources = expand_inputs(inputs, strict=strict)
    return _ingest(inputs, sources, out_dir, fmt, strict, max_chars, chunk_rows, progress)


def _ingest(
    inputs: list[str],
    sources: list[Source],
    out_dir: str | os.PathLike,
    fmt: str,
    strict: bool,
    max_chars: int,
    chunk_rows: int,
    progress: bool | None,
) -> IngestResult:
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".ingest-tmp-{uuid.uuid4().hex[:8]}"
    tmp_shards = tmp / SHARDS_DIR
    tmp_shards.mkdir(parents=True)
    sink = _Sink(tmp / REJECTED_NAME, tmp / FLAGGED_NAME, strict)
    n_valid = 0
    shards: list[str] = []
    try:
        writers: dict[int, _ShardWriter] = {}
        current: _ShardWriter | None = None
        for fi, src, line, rec in _validate_stream(
            sources,
            fmt=fmt,
            max_chars=max_chars,
            on_reject=sink.reject,
            on_flag=sink.flag,
            strict=strict,
            progress=progress,
        ):
            if current is None or current.file_index != fi:
                if current is not None:
                    current.close()
                current = writers[fi] = _ShardWriter(tmp_shards, fi, _safe_stem(src.stem), chunk_rows)
            current.add(rec, src.name, line)
            n_valid += 1
        if current is not None:
            current.close()
        sink.close()
        shards = [n for fi in sorted(writers) for n in writers[fi].names]
        # Swap the finished outputs in (each a rename; the previous shards dir is removed after).
        old = out / f".old-{uuid.uuid4().hex[:8]}"
        if (out / SHARDS_DIR).exists():
            (out / SHARDS_DIR).rename(old)
        tmp_shards.rename(out / SHARDS_DIR)
        for name in (REJECTED_NAME, FLAGGED_NAME):
            (tmp / name).replace(out / name)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        sink.close()
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    result = IngestResult(
        out_dir=str(out),
        n_read=n_valid + sink.n_rejected,
        n_valid=n_valid,
        n_rejected=sink.n_rejected,
        n_flagged=sink.n_flagged,
        shards=[str(out / SHARDS_DIR / n) for n in shards],
        reject_reasons=dict(sink.reasons),
        n_files=len(sources),
        wall_s=time.perf_counter() - t0,
    )
    write_manifest(
        out,
        stage="ingest",
        config=_config(inputs, fmt, strict, max_chars, chunk_rows),
        inputs={s.name: fingerprint(s.name) for s in sources},
        counts=result.counts(),
        wall_s=result.wall_s,
        extra={"shards": shards},
    )
    return result


def ensure_ingested(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    fmt: str = "auto",
    strict: bool = False,
    max_chars: int = DEFAULT_MAX_CHARS,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: bool | None = None,
) -> IngestResult:
    """The existing ingest when its manifest matches (config + input fingerprints + shards present)."""
    inputs = _as_list(inputs)
    out = Path(out_dir)
    config = _config(inputs, fmt, strict, max_chars, chunk_rows)
    sources = expand_inputs(inputs, strict=strict)
    if manifest_matches(out, config=config, inputs=[s.name for s in sources]):
        manifest = read_manifest(out) or {}
        names = (manifest.get("extra") or {}).get("shards", [])
        if [p.name for p in list_shards(out)] == list(names):
            c = manifest.get("counts", {})
            return IngestResult(
                out_dir=str(out),
                n_read=int(c.get("n_read", 0)),
                n_valid=int(c.get("n_valid", 0)),
                n_rejected=int(c.get("n_rejected", 0)),
                n_flagged=int(c.get("n_flagged", 0)),
                shards=[str(out / SHARDS_DIR / n) for n in names],
                reject_reasons=dict(c.get("reject_reasons", {})),
                n_files=int(c.get("n_files", len(sources))),
                skipped=True,
            )
    return _ingest(inputs, sources, out, fmt, strict, max_chars, chunk_rows, progress)


def list_shards(ingest_dir: str | os.PathLike) -> list[Path] | list[str]:
    """The ingested shards, sorted by name: the order of the pool (``Path``s; URIs for a URI dir)."""
    if storage.is_uri(ingest_dir):
        return storage.list_files(storage.join(ingest_dir, SHARDS_DIR), suffix=".parquet")
    d = Path(ingest_dir) / SHARDS_DIR
    return sorted(d.glob("*.parquet")) if d.is_dir() else []


def iter_ingested_records(
    ingest_dir: str | os.PathLike,
    *,
    shards: Sequence[str | os.PathLike] | None = None,
    batch_rows: int = 4096,
) -> Iterator[dict[str, Any]]:
    """Stream ``{"dataset", "id", "messages", "source_file", "source_line"}`` dicts in pool order."""
    import pyarrow.parquet as pq

    for path in shards if shards is not None else list_shards(ingest_dir):
        pf = pq.ParquetFile(storage.open_input(path))
        for batch in pf.iter_batches(batch_size=batch_rows):
            for row in batch.to_pylist():
                row["messages"] = json.loads(row["messages"])
                yield row


# --------------------------------------------------------------------------- CLI
def validate_main(
    files: Sequence[str],
    out: str | Path,
    *,
    strict: bool = False,
    fmt: str = "auto",
    max_chars: int = DEFAULT_MAX_CHARS,
) -> int:
    """``selectmoe validate FILE... --out DIR [--strict] [--format F] [--max-chars N]``.

    Validates without writing shards: DIR/rejected.jsonl and DIR/flagged.jsonl, counts per reason on
    stdout. Exit 0 (bad rows quarantined), 2 with ``strict`` at the first bad row (``file:line: reason``
    on stderr), 1 when an input does not exist.
    """
    try:
        sources = expand_inputs(list(files), strict=strict)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sink = _Sink(out / REJECTED_NAME, out / FLAGGED_NAME, strict)
    n_valid = 0
    try:
        for _ in _validate_stream(
            sources,
            fmt=fmt,
            max_chars=max_chars,
            on_reject=sink.reject,
            on_flag=sink.flag,
            strict=strict,
            progress=None,
        ):
            n_valid += 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        sink.close()
    report = {
        "files": len(sources),
        "n_read": n_valid + sink.n_rejected,
        "n_valid": n_valid,
        "n_rejected": sink.n_rejected,
        "n_flagged": sink.n_flagged,
        "reject_reasons": dict(sorted(sink.reasons.items())),
        "rejected": str(out / REJECTED_NAME),
    }
    for reason, count in sorted(sink.reasons.items()):
        print(f"{reason}: {count}")
    print(json.dumps(report))
    return 0
