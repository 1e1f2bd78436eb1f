"""Pool readers: expand inputs (files, directories, globs, pyarrow-filesystem URIs) and stream raw rows.

Each row comes back as a :class:`RawRow` with its 1-based ``line`` (JSONL: the physical line; JSON: the
line where the element starts; Parquet: row index + 1) and either the parsed object or an error reason,
so the ingest can report every bad row with file, line and reason -- nothing is skipped silently
(blank JSONL lines are not rows).
"""

from __future__ import annotations

import glob as globlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selectmoe.data.records import BROKEN_JSON, NOT_UTF8, READ_ERROR, TRUNCATED_JSON, excerpt

SUFFIXES = (".jsonl", ".json", ".parquet")
_GLOB_CHARS = set("*?[")


@dataclass
class RawRow:
    line: int
    obj: Any = None
    raw: str = ""
    error: str | None = None  # a reason code when the row could not be parsed
    detail: str = ""


@dataclass(frozen=True)
class Source:
    """One input file: ``name`` is what reports show (the local path or the URI)."""

    name: str

    @property
    def stem(self) -> str:
        base = self.name.rstrip("/").rsplit("/", 1)[-1]
        for suffix in SUFFIXES:
            if base.endswith(suffix):
                return base[: -len(suffix)]
        return Path(base).stem

    @property
    def suffix(self) -> str:
        base = self.name.rsplit("/", 1)[-1].lower()
        for suffix in SUFFIXES:
            if base.endswith(suffix):
                return suffix
        return Path(base).suffix

    def open(self):
        """A binary file object (local or through a pyarrow filesystem)."""
        if _is_uri(self.name):
            import pyarrow.fs as pafs

            fs, inner = pafs.FileSystem.from_uri(self.name)
            return fs.open_input_file(inner)
        return open(self.name, "rb")


def _is_uri(s: str) -> bool:
    return "://" in s


def expand_inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Source]:
    """Files, directories (every *.jsonl/*.json/*.parquet below, sorted), globs and URIs -> sources.

    Order: inputs in the given order, each expanded in sorted order; duplicates removed (first kept).
    Raises ``FileNotFoundError`` for an input that matches nothing.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    out: list[str] = []
    for item in inputs:
        spec = str(item)
        found = _expand_uri(spec) if _is_uri(spec) else _expand_local(spec)
        if not found:
            raise FileNotFoundError(f"pool input {spec!r} matches no .jsonl/.json/.parquet file")
        out.extend(found)
    seen: set[str] = set()
    return [Source(s) for s in out if not (s in seen or seen.add(s))]


def _expand_local(spec: str) -> list[str]:
    path = Path(spec).expanduser()
    if any(c in spec for c in _GLOB_CHARS) and not path.exists():
        hits = sorted(globlib.glob(str(path), recursive=True))
        files = []
        for h in hits:
            files.extend(_expand_local(h) if Path(h).is_dir() else [h])
        return files
    if path.is_dir():
        return sorted(
            str(p)
            for p in path.rglob("*")
            if p.is_file() and p.suffix.lower() in SUFFIXES and not _hidden(p, path)
        )
    if path.is_file():
        return [str(path)]
    return []


def _hidden(p: Path, root: Path) -> bool:
    return any(part.startswith((".", "_")) for part in p.relative_to(root).parts)


def _expand_uri(spec: str) -> list[str]:
    import pyarrow.fs as pafs

    fs, inner = pafs.FileSystem.from_uri(spec)
    scheme = spec.split("://", 1)[0]
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.File:
        return [spec]
    if info.type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
    base = inner.rstrip("/")
    files = []
    for fi in infos:
        rel = fi.path[len(base) :].lstrip("/")
        if fi.type != pafs.FileType.File or not fi.path.lower().endswith(SUFFIXES):
            continue
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue
        files.append(fi.path)
    files.sort()
    if scheme == "file":
        return [f"file://{p}" for p in files]
    return [f"{scheme}://{p}" for p in files]


# --------------------------------------------------------------------------- row readers
def iter_rows(source: Source, *, parquet_batch_rows: int = 8192) -> Iterator[RawRow]:
    suffix = source.suffix
    if suffix == ".parquet":
        yield from _iter_parquet(source, parquet_batch_rows)
    elif suffix == ".json":
        yield from _iter_json(source)
    else:  # .jsonl and anything else line-oriented
        yield from _iter_jsonl(source)


def _decode(data: bytes) -> tuple[str | None, str]:
    try:
        return data.decode("utf-8"), ""
    except UnicodeDecodeError as exc:
        return None, f"invalid UTF-8 byte at offset {exc.start}"


def _iter_jsonl(source: Source) -> Iterator[RawRow]:
    with source.open() as fh:
        for lineno, data in enumerate(_binary_lines(fh), start=1):
            text, err = _decode(data)
            if text is None:
                yield RawRow(lineno, raw=excerpt(data.decode("utf-8", "replace")), error=NOT_UTF8, detail=err)
                continue
            if lineno == 1:
                text = text.removeprefix("\ufeff")
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                yield RawRow(
                    lineno,
                    raw=excerpt(text.rstrip("\r\n")),
                    error=BROKEN_JSON,
                    detail=f"{exc.msg} at column {exc.colno}",
                )
                continue
            yield RawRow(lineno, obj=obj, raw=excerpt(text.rstrip("\r\n")))


def _binary_lines(fh) -> Iterator[bytes]:
    """Lines of a binary stream (works for Python files and pyarrow NativeFile alike)."""
    if hasattr(fh, "readline") and not _is_native(fh):
        yield from fh
        return
    pending = b""
    while True:
        chunk = fh.read(1 << 20)
        if not chunk:
            break
        pending += bytes(chunk)
        *lines, pending = pending.split(b"\n")
        for ln in lines:
            yield ln + b"\n"
    if pending:
        yield pending


def _is_native(fh) -> bool:
    try:
        import pyarrow as pa

        return isinstance(fh, pa.NativeFile)
    except ImportError:  # pragma: no cover
        return False


def _iter_json(source: Source) -> Iterator[RawRow]:
    """A JSON array, a single object, or concatenated objects; a cut-off tail is one rejected row."""
    with source.open() as fh:
        data = bytes(fh.read())
    text, err = _decode(data)
    if text is None:
        yield RawRow(1, raw=excerpt(data.decode("utf-8", "replace")), error=NOT_UTF8, detail=err)
        return
    text = text.removeprefix("\ufeff")
    decoder = json.JSONDecoder()
    n = len(text)

    def skip_ws(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    def line_of(i: int) -> int:
        return text.count("\n", 0, i) + 1

    i = skip_ws(0)
    if i >= n:
        return
    in_array = text[i] == "["
    if in_array:
        i = skip_ws(i + 1)
        if i < n and text[i] == "]":
            return
    while i < n:
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            # Everything from here on is unusable (we cannot resync inside JSON): one row for the tail.
            reason = TRUNCATED_JSON if exc.pos >= n - 1 or in_array else BROKEN_JSON
            yield RawRow(
                line_of(i), raw=excerpt(text[i:]), error=reason, detail=f"{exc.msg} (line {exc.lineno})"
            )
            return
        yield RawRow(line_of(i), obj=obj, raw=text[i:end])
        i = skip_ws(end)
        if in_array:
            if i < n and text[i] == ",":
                i = skip_ws(i + 1)
                continue
            if i < n and text[i] == "]":
                i = skip_ws(i + 1)
                if i < n:
                    yield RawRow(
                        line_of(i), raw=excerpt(text[i:]), error=BROKEN_JSON, detail="data after the array"
                    )
                return
            yield RawRow(
                line_of(i),
                raw=excerpt(text[i:]) if i < n else "",
                error=TRUNCATED_JSON,
                detail="array not closed" if i >= n else "expected ',' or ']'",
            )
            return


def _iter_parquet(source: Source, batch_rows: int) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        with source.open() as fh:
            pf = pq.ParquetFile(fh)
            row = 0
            for batch in pf.iter_batches(batch_size=batch_rows):
                for obj in batch.to_pylist():
                    row += 1
                    yield RawRow(row, obj=obj, raw="")
    except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError
        yield RawRow(row + 1 if "row" in locals() else 1, raw="", error=READ_ERROR, detail=str(exc)[:300])
