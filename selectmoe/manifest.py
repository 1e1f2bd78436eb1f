"""Stage manifests: what a stage read, with which config and versions, and what it produced.

Every stage writes ``_manifest.json`` into its output directory. A rerun compares the config hash and
the input fingerprints with the recorded ones and skips the stage when they match, which is what makes
``selectmoe run`` resumable and reproducible.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import socket
import time
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from selectmoe import storage
from selectmoe.cpu_isa import cpu_isa_level

MANIFEST_NAME = "_manifest.json"
_TRACKED_PACKAGES = ("selectmoe", "torch", "transformers", "peft", "ray", "lm_eval", "pyarrow", "numpy")
# Every file is hashed whole: a head+tail sample misses a same-size edit in the middle, and sha256 with
# the CPU's SHA extensions streams 0.5-1.2 GB/s (0.2 s for the 125 MB ShareGPT file, docs/benchmarks.md).
_HASH_CHUNK = 1 << 20


def jsonable(obj: Any) -> Any:
    """THE JSON sanitiser (manifests, config hashes, run identities, checkpoint state, lm-eval results):
    dataclasses, mappings, sequences, sets, paths, OmegaConf containers, numpy/torch values -> plain JSON
    types; callables inside mappings (schedulers' lambdas, lm-eval's task hooks) are dropped. Anything else
    is returned as is (``json.dumps(default=str)`` writes it)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    if isinstance(obj, (DictConfig, ListConfig)):
        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items() if not callable(v)}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in (sorted(obj, key=str) if isinstance(obj, (set, frozenset)) else obj)]
    if isinstance(obj, Path):
        return str(obj)
    if callable(getattr(obj, "numel", None)) and obj.numel() == 1:  # a one-element tensor: its value
        return obj.item()
    if callable(getattr(obj, "tolist", None)):  # numpy scalars / arrays, torch tensors
        return obj.tolist()
    return obj


def config_hash(obj: Any) -> str:
    """A stable sha256 of a config (dataclass, mapping, OmegaConf) via canonical JSON."""
    canonical = json.dumps(jsonable(obj), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Fingerprint a file or a directory (every file below it, sorted) by content hash.

    URIs (``s3://`` etc.) are fingerprinted by their listing (names, sizes, modification times:
    :func:`selectmoe.storage.tree_fingerprint`), since reading them whole to hash would cost a full
    download; an object store gives every PUT a new mtime, so a rewritten object is a new fingerprint.
    """
    spath = str(path)
    if storage.is_uri(spath):
        fs, inner = storage.resolve(spath)
        info = fs.get_file_info(inner)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"cannot fingerprint {spath}: no such file or directory")
        # "sha256" is the digest of the listing here (see "method"), so callers need no second case.
        listing = storage.tree_fingerprint(spath)
        if info.type == pafs.FileType.File:
            return {"path": spath, "size": info.size, "mtime": str(info.mtime), "sha256": listing,
                    "method": "uri-info"}  # fmt: skip
        return {"path": spath, "sha256": listing, "method": "uri-listing"}
    local = Path(spath.removeprefix("file://"))
    if not local.exists():
        raise FileNotFoundError(f"cannot fingerprint {spath}: no such file or directory")
    if local.is_dir():
        files = sorted(p for p in local.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
        digest = hashlib.sha256()
        total = 0
        for f in files:
            sub = fingerprint(f)
            total += sub["size"]
            digest.update(f"{f.relative_to(local)}:{sub['sha256']}".encode())
        return {"path": spath, "size": total, "files": len(files), "sha256": digest.hexdigest()}
    size = local.stat().st_size
    return {"path": spath, "size": size, "sha256": _hash_file(local), "method": "sha256"}


def package_versions() -> dict[str, str]:
    versions = {}
    for name in _TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            try:
                versions[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                continue
    versions["python"] = platform.python_version()
    versions["cpu_isa"] = cpu_isa_level()  # torch's CPU kernels round per level (selectmoe.cpu_isa)
    return versions


def write_manifest(
    directory: str | os.PathLike,
    *,
    stage: str,
    config: Any,
    inputs: Iterable[str | os.PathLike] | Mapping[str, Any] = (),
    counts: Mapping[str, Any] | None = None,
    seed: int | None = None,
    wall_s: float | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``_manifest.json`` atomically (tmp + rename locally, one PUT on an object store) so a killed
    stage never leaves a half file."""
    manifest = {
        "stage": stage,
        "complete": True,
        "config": jsonable(config),
        "config_hash": config_hash(config),
        "inputs": _input_fingerprints(inputs),
        "counts": jsonable(dict(counts or {})),
        "seed": seed,
        "wall_s": None if wall_s is None else round(float(wall_s), 3),
        "versions": package_versions(),
        "host": socket.gethostname(),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if extra:
        manifest["extra"] = jsonable(dict(extra))
    storage.write_text(
        storage.join(directory, MANIFEST_NAME),
        json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n",
    )
    return manifest


def _input_fingerprints(inputs: Iterable[str | os.PathLike] | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(inputs, Mapping):
        return {str(k): v if isinstance(v, dict) else fingerprint(v) for k, v in inputs.items()}
    return {str(p): fingerprint(p) for p in inputs}


def read_manifest(directory: str | os.PathLike) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_text(storage.join(directory, MANIFEST_NAME)))
    except (OSError, json.JSONDecodeError):  # absent (pyarrow: FileNotFoundError) or half-written
        return None


def manifest_matches(
    directory: str | os.PathLike,
    *,
    config: Any,
    inputs: Iterable[str | os.PathLike] | Mapping[str, Any] = (),
) -> bool:
    """True when the stage in ``directory`` completed with this config on these exact inputs."""
    manifest = read_manifest(directory)
    if not manifest or not manifest.get("complete"):
        return False
    if manifest.get("config_hash") != config_hash(config):
        return False
    try:
        current = _input_fingerprints(inputs)
    except FileNotFoundError:
        return False
    recorded = manifest.get("inputs", {})
    return {k: _strip(v) for k, v in current.items()} == {k: _strip(v) for k, v in recorded.items()}


def _strip(fp: Any) -> Any:
    # Only content matters, not where the path string came from.
    return {k: v for k, v in fp.items() if k != "path"} if isinstance(fp, dict) else fp
