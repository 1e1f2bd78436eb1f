"""THE path layer: every stage reads and writes through ``pyarrow.fs``, so a run lives on local disk, NFS,
``s3://`` or ``gs://`` alike.

A location is a string: a local path (absolute or not, ``file://`` allowed) or a URI. :func:`resolve` turns
it into ``(filesystem, path)``; the rest are the few operations stages need (join, exists, read/write
whole small files, list, make directories, copy trees). Object stores have no directories and no rename:
:func:`makedirs` is a no-op there, and a whole-object PUT is already atomic, so :func:`write_bytes` writes
directly; on a local filesystem it writes ``.tmp`` + rename so a killed stage never leaves half a file.

Libraries that insist on a local directory (``from_pretrained``, tokenizers, lm-eval's output,
matplotlib) get one from :func:`local_copy` (a remote directory staged to a node-local cache, keyed by
its fingerprint, so every process on a node downloads a model once and a changed model is fetched anew)
or write into :func:`local_output` (a scratch directory uploaded when the block exits). Credentials and
endpoints come from the standard environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), which
pyarrow reads itself; nothing here is configured per run.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs

CACHE_ENV = "SELECTMOE_CACHE"  # the node-local cache root (default ~/.cache/selectmoe)


def is_uri(location: str | os.PathLike) -> bool:
    """True for ``scheme://`` locations other than ``file://`` (those are local paths)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def _local(location: str | os.PathLike) -> str:
    return os.path.abspath(os.path.expanduser(str(location).removeprefix("file://")))


@functools.lru_cache(maxsize=32)
def _filesystem(scheme_and_authority: str) -> pafs.FileSystem:
    # One filesystem object per bucket and process: S3FileSystem construction resolves the region and
    # credentials, a few ms that would otherwise be paid per file.
    return pafs.FileSystem.from_uri(scheme_and_authority)[0]


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` for a local path or a URI."""
    text = str(location)
    if not is_uri(text):
        return pafs.LocalFileSystem(), _local(text)
    scheme, rest = text.split("://", 1)
    if scheme in ("s3", "gs", "gcs"):  # path = bucket/key, as pyarrow's from_uri gives it
        return _filesystem(f"{scheme}://{rest.split('/', 1)[0]}"), rest.rstrip("/")
    return pafs.FileSystem.from_uri(text)


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base/part/...`` as a string: posix joins for URIs, ``os.path.join`` for local paths."""
    text = str(base)
    return posixpath.join(text, *parts) if is_uri(text) else os.path.join(text, *parts)


def name(location: str | os.PathLike) -> str:
    """The last component (``a/b.parquet`` -> ``b.parquet``)."""
    return posixpath.basename(str(location).rstrip("/"))


def parent(location: str | os.PathLike) -> str:
    text = str(location).rstrip("/")
    return text.rsplit("/", 1)[0] if is_uri(text) else os.path.dirname(text)


def _info(location: str | os.PathLike) -> pafs.FileInfo:
    fs, path = resolve(location)
    return fs.get_file_info(path)


def exists(location: str | os.PathLike) -> bool:
    return _info(location).type != pafs.FileType.NotFound


def is_file(location: str | os.PathLike) -> bool:
    return _info(location).type == pafs.FileType.File


def is_dir(location: str | os.PathLike) -> bool:
    return _info(location).type == pafs.FileType.Directory


def makedirs(location: str | os.PathLike) -> None:
    """Create a directory and its parents (a no-op on object stores: keys need no directories)."""
    fs, path = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(path, exist_ok=True)


def list_files(location: str | os.PathLike, *, suffix: str = "", recursive: bool = False) -> list[str]:
    """Files directly in (or, ``recursive``, below) a directory whose names end in ``suffix``, sorted, as
    locations of the same kind as ``location``. A missing directory has no files."""
    fs, path = resolve(location)
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=recursive)
    base = str(location).rstrip("/")
    out = []
    for info in fs.get_file_info(selector):
        if info.type == pafs.FileType.File and info.base_name.endswith(suffix):
            rel = info.path[len(path.rstrip("/")) :].lstrip("/")
            out.append(join(base, *rel.split("/")))
    return sorted(out)


def read_bytes(location: str | os.PathLike) -> bytes:
    fs, path = resolve(location)
    with fs.open_input_stream(path) as fh:
        return fh.read()


def read_text(location: str | os.PathLike) -> str:
    return read_bytes(location).decode("utf-8")


def read_json(location: str | os.PathLike):
    return json.loads(read_text(location))


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    """Write a whole file: ``.tmp`` + rename locally, one PUT (atomic already) on an object store."""
    fs, path = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as fh:
        fh.write(data)


def write_text(location: str | os.PathLike, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def open_input(location: str | os.PathLike):
    """A seekable binary file (Parquet readers need random access)."""
    fs, path = resolve(location)
    return fs.open_input_file(path)


def open_output(location: str | os.PathLike):
    """A binary output stream (the parent directory is made on local disk)."""
    fs, path = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    return fs.open_output_stream(path)


def move(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename within one filesystem (copy + delete on object stores)."""
    fs, src_path = resolve(src)
    fs.move(src_path, resolve(dst)[1])


def remove(location: str | os.PathLike) -> None:
    """Delete a file or a whole directory tree; absent is fine."""
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def upload_dir(local_dir: str | os.PathLike, location: str | os.PathLike) -> None:
    """Copy every file below ``local_dir`` to ``location`` (same relative names; nothing is deleted)."""
    fs, path = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem) and os.path.realpath(local_dir) == os.path.realpath(path):
        return
    makedirs(location)
    pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download_dir(
    location: str | os.PathLike, local_dir: str | os.PathLike, *, skip: tuple[str, ...] = ()
) -> None:
    """Copy every file below ``location`` into ``local_dir``; ``skip``: files whose relative path (with a
    leading ``/``) contains one of these strings stay behind."""
    fs, path = resolve(location)
    os.makedirs(local_dir, exist_ok=True)
    if not skip:
        pafs.copy_files(
            path, str(local_dir), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
        )
        return
    base = path.rstrip("/")
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        rel = info.path[len(base) :]
        if info.type != pafs.FileType.File or any(s in rel for s in skip):
            continue
        target = os.path.join(str(local_dir), *rel.lstrip("/").split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with fs.open_input_stream(info.path) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "selectmoe")


def tree_fingerprint(location: str | os.PathLike) -> str:
    """A cheap identity of a remote file or tree: relative names, sizes and modification times (an object
    store writes a new mtime on every PUT, so a re-uploaded model is a new fingerprint)."""
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such file or directory: {location}")
    infos = (
        [info]
        if info.type == pafs.FileType.File
        else fs.get_file_info(pafs.FileSelector(path, recursive=True))
    )
    digest = hashlib.sha256()
    for fi in sorted(infos, key=lambda f: f.path):
        if fi.type == pafs.FileType.File:
            digest.update(f"{fi.path[len(path) :]}:{fi.size}:{fi.mtime_ns}\n".encode())
    return digest.hexdigest()


def local_copy(location: str | os.PathLike) -> str:
    """A local path holding ``location``: the location itself when local (or a hub id), else a node-local copy under
    ``cache_root()/staged/<fingerprint>`` (downloaded once per node: a finished copy is reused, concurrent
    stagers each download to a temp dir and the first rename wins)."""
    if not is_uri(location):
        return str(location).removeprefix("file://")
    fs, path = resolve(location)
    key = tree_fingerprint(location)[:32]
    target = cache_root() / "staged" / key / name(location)
    if target.exists():
        return str(target)
    target.parent.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent.parent))
    try:
        if fs.get_file_info(path).type == pafs.FileType.File:
            with fs.open_input_stream(path) as src, open(tmp / name(location), "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            download_dir(location, tmp / name(location))
        with contextlib.suppress(OSError):  # another process staged it first
            os.rename(tmp, target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


_SCRATCH: dict[str, str] = {}  # open local_output scratch dirs -> the URI they are uploaded to


@contextlib.contextmanager
def local_output(location: str | os.PathLike) -> Iterator[Path]:
    """A local directory to write ``location``'s files into: the directory itself when local (made), else
    a scratch directory uploaded to ``location`` when the block exits without an error."""
    if not is_uri(location):
        path = Path(_local(location))
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="selectmoe-out-") as tmp:
        _SCRATCH[tmp] = str(location).rstrip("/")
        try:
            yield Path(tmp)
        finally:
            _SCRATCH.pop(tmp, None)
        upload_dir(tmp, location)


def published(path: str | os.PathLike) -> str:
    """Where a file written now will live once uploaded: its URI when it lies in an open
    :func:`local_output` scratch directory, else the path itself (absolute). For files that name other
    files (a task YAML naming its data): the name must outlive the scratch directory."""
    local = _local(path)
    for tmp, uri in _SCRATCH.items():
        if local == tmp or local.startswith(tmp + os.sep):
            return uri + local[len(tmp) :].replace(os.sep, "/")
    return local


def ray_storage(location: str | os.PathLike) -> tuple[str, pafs.FileSystem | None]:
    """Ray Train's ``(storage_path, storage_filesystem)``: an absolute local path (no filesystem), or
    the path inside the bucket with its pyarrow filesystem (the one carrying the endpoint and keys)."""
    if not is_uri(location):
        return _local(location), None
    return resolve(location)[1], resolve(location)[0]
