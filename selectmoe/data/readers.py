"""Pool readers: expand inputs (files, directories, globs, pyarrow-filesystem URIs) and stream raw rows.

Each row comes back as a :class:`RawRow` with its 1-based ``line`` -- the **text line** where the row
starts for JSONL and JSON (what an editor jumps to), the row number for Parquet, and ``0`` for a
rejection of the whole file (binary, unreadable) -- and either the parsed object or an error reason, so
the ingest can report every bad row with file, line and reason. Nothing is skipped silently: blank JSONL
lines are not rows, and every file a directory expansion leaves out is named in a warning.

Compressed inputs (``.gz``, ``.bz2``, ``.xz``, ``.zst``) are decompressed through fsspec's codecs, chosen
from the name as ``compression="infer"`` does; a codec fsspec cannot load is refused by name before any
row is read. JSON is parsed as a stream (``raw_decode`` over a sliding buffer with a running newline
count), so reading is linear in the file size and memory stays at about one chunk plus the largest row.
"""

from __future__ import annotations

import codecs
import contextlib
import glob as globlib
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selectmoe.data.records import (
    BINARY_FILE,
    BROKEN_JSON,
    NOT_UTF8,
    READ_ERROR,
    TRUNCATED_JSON,
    excerpt,
)

logger = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".json", ".parquet")
# Name ending -> fsspec codec name (fsspec.utils.compressions spells them the same way).
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}
_CODEC_PACKAGE = {"zstd": "zstandard"}
_GLOB_CHARS = set("*?[")
_DATASET_TAG = "#dataset="
_SNIFF_BYTES = 8192
# Leading bytes of formats that are not text: named in the binary_file rejection.
_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"(\xb5/\xfd": "zstd",
    b"BZh": "bz2",
    b"\xfd7zXZ\x00": "xz",
    b"PK\x03\x04": "zip",
    b"PAR1": "Parquet",
    b"\xff\xfe": "UTF-16",
    b"\xfe\xff": "UTF-16",
}
JSON_CHUNK = 1 << 20


@dataclass
class RawRow:
    line: int
    obj: Any = None
    raw: str = ""
    error: str | None = None  # a reason code when the row could not be parsed
    detail: str = ""


@dataclass(frozen=True)
class Source:
    """One input file: ``name`` is what reports show (the local path or the URI).

    ``dataset`` is the name set on the input (``path#dataset=NAME``); rows without their own ``dataset``
    get it, or the file stem when it is not set.
    """

    name: str
    dataset_name: str | None = None

    @property
    def _base(self) -> str:
        return self.name.rstrip("/").rsplit("/", 1)[-1]

    @property
    def compression(self) -> str | None:
        """The fsspec codec name for a compressed file (``None`` for plain files)."""
        ext = os.path.splitext(self._base.lower())[1]
        return COMPRESSIONS.get(ext)

    @property
    def _inner(self) -> str:
        """The name without its compression ending."""
        base = self._base
        return base[: base.rfind(".")] if self.compression else base

    @property
    def stem(self) -> str:
        base = self._inner
        for suffix in SUFFIXES:
            if base.lower().endswith(suffix):
                return base[: -len(suffix)]
        return Path(base).stem

    @property
    def dataset(self) -> str:
        return self.dataset_name or self.stem

    @property
    def suffix(self) -> str:
        base = self._inner.lower()
        for suffix in SUFFIXES:
            if base.endswith(suffix):
                return suffix
        return Path(base).suffix

    def _open_raw(self):
        if _is_uri(self.name):
            import pyarrow.fs as pafs

            fs, inner = pafs.FileSystem.from_uri(self.name)
            return fs.open_input_file(inner)
        return open(self.name, "rb")

    @contextlib.contextmanager
    def open(self):
        """A binary file object of the (decompressed) content, local or through a pyarrow filesystem."""
        with contextlib.ExitStack() as stack:
            fh = stack.enter_context(self._open_raw())
            if self.compression:
                from fsspec.compression import compr

                fh = stack.enter_context(compr[self.compression](fh, mode="rb"))
            yield fh


def _is_uri(s: str) -> bool:
    return "://" in s


def _data_file(name: str) -> bool:
    low = name.lower()
    ext = os.path.splitext(low)[1]
    if ext in COMPRESSIONS:
        low = low[: -len(ext)]
    return low.endswith(SUFFIXES)


def _check_codec(source: Source) -> None:
    """Refuse, by name, a compressed input that cannot be decompressed here (before any row is read)."""
    codec = source.compression
    if codec is None:
        return
    from fsspec.compression import compr

    if source.suffix == ".parquet":
        raise ValueError(
            f"pool input {source.name}: Parquet compresses its pages itself; store it uncompressed"
        )
    if codec not in compr:
        package = _CODEC_PACKAGE.get(codec, codec)
        raise ValueError(
            f"pool input {source.name}: {codec}-compressed, and fsspec has no {codec} codec here "
            f"(pip install {package}), or decompress the file"
        )


def _split_dataset(spec: str) -> tuple[str, str | None]:
    if _DATASET_TAG not in spec:
        return spec, None
    path, name = spec.rsplit(_DATASET_TAG, 1)
    if not name.strip():
        raise ValueError(f"pool input {spec!r}: empty name after '#dataset='")
    return path, name.strip()


def expand_inputs(
    inputs: str | os.PathLike | Sequence[str | os.PathLike], *, strict: bool = False
) -> list[Source]:
    """Files, directories (every data file below, sorted), globs and URIs -> sources.

    A data file is ``*.jsonl``/``*.json``/``*.parquet``, optionally ``.gz``/``.bz2``/``.xz``/``.zst``.
    ``path#dataset=NAME`` names the dataset of every row of that input that has none.
    Order: inputs in the given order, each expanded in sorted order; duplicates removed (first kept).
    Files a directory expansion leaves out (``_*``, ``.*``, other endings) are named in a warning, or an
    error when ``strict``; a file named explicitly or matched by a glob is always read. Raises ``FileNotFoundError`` for an input that matches nothing.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    out: list[Source] = []
    for item in inputs:
        spec, dataset = _split_dataset(str(item))
        skipped: list[str] = []
        found = _expand_uri(spec, skipped) if _is_uri(spec) else _expand_local(spec, skipped)
        if skipped:
            msg = (
                f"pool input {spec}: skipped {len(skipped)} file(s) that are not pool data: "
                + ", ".join(skipped[:10])
                + (", ..." if len(skipped) > 10 else "")
            )
            if strict:
                raise ValueError(msg + " (data.strict=true)")
            logger.warning(msg)
        if not found:
            raise FileNotFoundError(
                f"pool input {spec!r} matches no .jsonl/.json/.parquet file (optionally .gz/.bz2/.xz/.zst)"
            )
        out.extend(Source(s, dataset) for s in found)
    seen: set[str] = set()
    sources = [s for s in out if not (s.name in seen or seen.add(s.name))]
    for s in sources:
        _check_codec(s)
    return sources


def _expand_local(spec: str, skipped: list[str]) -> list[str]:
    path = Path(spec).expanduser()
    if any(c in spec for c in _GLOB_CHARS) and not path.exists():
        hits = sorted(globlib.glob(str(path), recursive=True))
        files = []
        for h in hits:
            files.extend(_expand_local(h, skipped) if Path(h).is_dir() else [h])
        return files
    if path.is_dir():
        files = []
        for p in sorted(path.rglob("*")):
            if not p.is_file():
                continue
            rel = p.relative_to(path)
            (files if _data_file(p.name) and not _hidden(rel.parts) else skipped).append(str(p))
        return files
    if path.is_file():
        return [str(path)]
    return []


def _hidden(parts: Sequence[str]) -> bool:
    return any(part.startswith((".", "_")) for part in parts)


def _expand_uri(spec: str, skipped: list[str]) -> list[str]:
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
    for fi in sorted(infos, key=lambda f: f.path):
        if fi.type != pafs.FileType.File:
            continue
        rel = fi.path[len(base) :].lstrip("/")
        ok = _data_file(fi.path) and not _hidden(rel.split("/"))
        (files if ok else skipped).append(f"{scheme}://{fi.path}")
    return files


# --------------------------------------------------------------------------- row readers
def iter_rows(source: Source, *, parquet_batch_rows: int = 8192) -> Iterator[RawRow]:
    """The rows of one file; a file that cannot be read, or is not text, is one ``line=0`` rejection."""
    if source.suffix == ".parquet":
        yield from _iter_parquet(source, parquet_batch_rows)
        return
    try:
        with source.open() as fh:
            head = bytes(fh.read(_SNIFF_BYTES))
    except (OSError, EOFError) as exc:
        yield RawRow(0, error=READ_ERROR, detail=f"cannot read the file: {exc}"[:300])
        return
    binary = _binary_kind(head)
    if binary:
        yield RawRow(0, raw=excerpt(head[:200].decode("utf-8", "replace")), error=BINARY_FILE, detail=binary)
        return
    try:
        with source.open() as fh:
            if source.suffix == ".json":
                yield from JsonStreamReader(fh).rows()
            else:  # .jsonl and anything else line-oriented
                yield from _iter_jsonl(fh)
    except (OSError, EOFError) as exc:  # e.g. a corrupt or cut-off .gz
        yield RawRow(0, error=READ_ERROR, detail=f"reading failed: {exc}"[:300])


def _binary_kind(head: bytes) -> str:
    """Why the leading bytes are not a text pool file ("" when they look like text)."""
    for magic, kind in _MAGIC.items():
        if not head.startswith(magic):
            continue
        if kind == "UTF-16":
            return "UTF-16 text, not UTF-8 (convert it: iconv -f UTF-16 -t UTF-8)"
        hint = "" if kind in ("zip", "Parquet") else f" (name it *.jsonl.{_ext_of(kind)} to have it read)"
        return f"{kind} data, not text{hint}"
    nul = head.find(b"\x00")
    return f"binary file: NUL byte at offset {nul}" if nul >= 0 else ""


def _ext_of(codec: str) -> str:
    return next(ext[1:] for ext, name in COMPRESSIONS.items() if name == codec)


def _decode(data: bytes) -> tuple[str | None, str]:
    try:
        return data.decode("utf-8"), ""
    except UnicodeDecodeError as exc:
        return None, f"invalid UTF-8 byte at offset {exc.start}"


def _iter_jsonl(fh) -> Iterator[RawRow]:
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


_WS = re.compile(r"[ \t\r\n]*")
_TOKEN_TAIL = 16  # an error this close to the buffer's end may be a token cut by the chunk boundary


class JsonStreamReader:
    """A JSON array, a single object, or concatenated values, read in chunks of ``chunk_size`` bytes.

    Why a class: it keeps the sliding text buffer, the line number at the buffer position and two
    counters a test can check -- ``peak_buffer`` (the most characters held at once: about one chunk
    plus the longest row) and ``scanned`` (characters passed to the newline count, each exactly once,
    so the work is linear). A row that does not parse yet is retried after reading more, with the read
    size doubled each time, so even a row of many chunks costs amortised linear time. A cut-off tail is
    one ``truncated_json`` row; a value that does not parse although more text follows is one
    ``broken_json`` row for the rest of the file (JSON cannot be resynchronised).
    """

    def __init__(self, fh, chunk_size: int = JSON_CHUNK):
        self._fh = fh
        self._chunk = chunk_size
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._json = json.JSONDecoder()
        self.buf = ""
        self.pos = 0
        self.line = 1  # the text line of buf[pos]
        self.eof = False
        self.bytes_read = 0
        self.peak_buffer = 0
        self.scanned = 0
        self.utf8_error = ""
        self._started = False

    # -- buffer
    def _fill(self, size: int) -> bool:
        """Append up to ``size`` more bytes of text; False at the end of the file (or a UTF-8 error)."""
        if self.eof:
            return False
        data = bytes(self._fh.read(size))
        try:
            text = self._decoder.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            self.utf8_error = f"invalid UTF-8 byte at offset {self.bytes_read + exc.start} of the file"
            self.eof = True
            return False
        if not self._started and text:  # the first decoded text (a BOM may span several reads)
            text, self._started = text.removeprefix("\ufeff"), True
        self.bytes_read += len(data)
        self.eof = not data
        if self.eof:  # the buffer (and every index into it) stays as it was
            return False
        if self.pos:  # drop what was read; the caller re-decodes from the new pos 0
            self.buf, self.pos = self.buf[self.pos :], 0
        self.buf += text
        self.peak_buffer = max(self.peak_buffer, len(self.buf))
        return True

    def _advance(self, end: int) -> None:
        self.line += self.buf.count("\n", self.pos, end)
        self.scanned += end - self.pos
        self.pos = end

    def _skip_ws(self) -> None:
        """Skip whitespace, reading more until a non-blank character or the end of the file."""
        while True:
            self._advance(_WS.match(self.buf, self.pos).end())
            if self.pos < len(self.buf) or not self._fill(self._chunk):
                return

    def _peek(self) -> str:
        self._skip_ws()
        return self.buf[self.pos] if self.pos < len(self.buf) else ""

    def _tail_row(self, reason: str, detail: str) -> RawRow:
        if self.utf8_error:
            reason, detail = NOT_UTF8, self.utf8_error
        return RawRow(
            self.line, raw=excerpt(self.buf[self.pos : self.pos + 2000]), error=reason, detail=detail
        )

    def _value(self) -> RawRow:
        """Decode the value at ``pos`` (reading more while it is incomplete) and step past it."""
        size = self._chunk
        self._skip_ws()
        while True:
            try:
                obj, end = self._json.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                unterminated = exc.msg.startswith("Unterminated string")
                at_end = exc.pos >= len(self.buf) - 1 or unterminated
                # More text can only help an error near the buffer's end (a token cut by the chunk
                # boundary: `1.5e+`, `tru`, `\u12`) or an open string; anything else is broken as is,
                # so a broken row is reported without reading the rest of the file into memory.
                may_continue = exc.pos >= len(self.buf) - _TOKEN_TAIL or unterminated
                if may_continue and self._fill(size):
                    size *= 2
                    continue
                return self._tail_row(TRUNCATED_JSON if at_end else BROKEN_JSON, exc.msg)
            if end > len(self.buf) - _TOKEN_TAIL and self._fill(size):  # `1` may be `1.5e3` cut short
                continue
            row = RawRow(self.line, obj=obj, raw=excerpt(self.buf[self.pos : min(end, self.pos + 2000)]))
            self._advance(end)
            return row

    # -- grammar
    def rows(self) -> Iterator[RawRow]:
        first = self._peek()
        if not first:
            if self.utf8_error:
                yield self._tail_row(NOT_UTF8, "")
            return
        if first != "[":
            yield from self._values()
            return
        self._advance(self.pos + 1)
        if self._peek() == "]":
            self._advance(self.pos + 1)
            yield from self._after_array()
            return
        while True:
            row = self._value()
            yield row
            if row.error:
                return
            nxt = self._peek()
            if nxt == ",":
                self._advance(self.pos + 1)
                continue
            if nxt == "]":
                self._advance(self.pos + 1)
                yield from self._after_array()
                return
            detail = "array not closed" if not nxt else "expected ',' or ']'"
            yield self._tail_row(TRUNCATED_JSON if not nxt else BROKEN_JSON, detail)
            return

    def _values(self) -> Iterator[RawRow]:
        while self._peek():
            row = self._value()
            yield row
            if row.error:
                return
        if self.utf8_error:
            yield self._tail_row(NOT_UTF8, "")

    def _after_array(self) -> Iterator[RawRow]:
        if self._peek():
            yield self._tail_row(BROKEN_JSON, "data after the array")
        elif self.utf8_error:
            yield self._tail_row(NOT_UTF8, "")


def _iter_parquet(source: Source, batch_rows: int) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    row = 0
    try:
        with source.open() as fh:
            pf = pq.ParquetFile(fh)
            for batch in pf.iter_batches(batch_size=batch_rows):
                for obj in batch.to_pylist():
                    row += 1
                    yield RawRow(row, obj=obj, raw="")
    except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError
        yield RawRow(row + 1 if row else 0, raw="", error=READ_ERROR, detail=str(exc)[:300])
