"""Shard completion records of the score stage: when an output shard counts as done, and its verification.

An output shard is done only when ``shards/<name>.parquet`` exists and ``shards/<name>.done.json`` records
the same input fingerprint, model fingerprint + scoring settings, row count and output checksum. A rerun
skips those; output shards whose ingest shard no longer exists are removed (:func:`remove_orphans`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from selectmoe import storage
from selectmoe.manifest import fingerprint
from selectmoe.router_data import SHARD_DIR
from selectmoe.scoring.model import resolve_dtype

logger = logging.getLogger(__name__)

# 2: NLL columns; 3: full_tokens; 4: optional gate/routing, hidden, text signals; 5: prompt_key
SCORE_FORMAT_VERSION = 5
DONE_SUFFIX = ".done.json"


def shard_name(path: Path) -> str:
    return Path(path).name.removesuffix(".parquet")


def done_path(out_dir: Path, name: str) -> Path:
    return out_dir / SHARD_DIR / f"{name}{DONE_SUFFIX}"


def out_path(out_dir: Path, name: str) -> Path:
    return out_dir / SHARD_DIR / f"{name}.parquet"


def input_record(path: Path) -> dict[str, Any]:
    fp = fingerprint(path)
    rows = pq.ParquetFile(storage.open_input(path)).metadata.num_rows
    return {"sha256": fp["sha256"], "size": fp["size"], "rows": rows}


def shard_is_done(out_dir: Path, name: str, inp: Mapping[str, Any], model_fp: str) -> bool:
    out, done = out_path(out_dir, name), done_path(out_dir, name)
    if not (out.is_file() and done.is_file()):
        return False
    try:
        rec = json.loads(done.read_text())
    except json.JSONDecodeError:
        return False
    return (
        rec.get("format") == SCORE_FORMAT_VERSION
        and rec.get("input") == dict(inp)
        and rec.get("model_fingerprint") == model_fp
        and rec.get("rows") == inp["rows"]
        and rec.get("output_sha256") == fingerprint(out)["sha256"]
        and pq.ParquetFile(out).metadata.num_rows == inp["rows"]
    )


def finish_shard(out_dir: Path, name: str, ingest_shard: Path, inp: Mapping[str, Any], model_fp: str) -> int:
    """Verify a closed output shard against its ingest shard, then write its completion record."""
    out = out_path(out_dir, name)
    got = pq.read_table(out, columns=["id"]).column("id").to_pylist()
    want = pq.read_table(storage.open_input(ingest_shard), columns=["id"]).column("id").to_pylist()
    if len(got) != len(want) or len(set(got)) != len(got) or set(got) != set(want):
        missing, extra = set(want) - set(got), set(got) - set(want)
        out.unlink(missing_ok=True)
        raise RuntimeError(
            f"score shard {name}: {len(got)} rows ({len(set(got))} distinct) vs {len(want)} ingested; "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}"
        )
    record = {
        "format": SCORE_FORMAT_VERSION,
        "shard": name,
        "rows": len(got),
        "input": dict(inp),
        "model_fingerprint": model_fp,
        "output_sha256": fingerprint(out)["sha256"],
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    done = done_path(out_dir, name)
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    tmp.replace(done)
    return len(got)


def remove_orphans(out_dir: Path, names: set[str]) -> None:
    shard_dir = out_dir / SHARD_DIR
    if not shard_dir.is_dir():
        return
    for p in shard_dir.iterdir():
        stem = p.name
        for suffix in (".parquet.tmp", ".parquet", DONE_SUFFIX, ".done.tmp"):
            if stem.endswith(suffix):
                stem = stem.removesuffix(suffix)
                break
        else:
            continue
        if stem not in names or p.name.endswith((".tmp",)):
            logger.warning("score: removing stale %s", p)
            p.unlink(missing_ok=True)


def model_fingerprint(
    model_dir: str,
    encoding: Mapping[str, Any],
    dtype: str,
    use_gpu: bool,
    *,
    ifd: bool = False,
    hidden_dim: int = 0,
) -> str:
    """Model weights/config/tokenizer + the settings that change the numbers (encoding, dtype, IFD pass,
    stored hidden width) +
    the score stage's code version (a changed scoring function rescores every shard)."""
    from selectmoe.code_version import code_version

    fp = fingerprint(model_dir)
    payload = {
        "code": code_version("selectmoe.stages.score"),
        "model": fp["sha256"],
        "encoding": dict(encoding),
        "dtype": str(resolve_dtype(dtype, use_gpu)),
        "format": SCORE_FORMAT_VERSION,
        "ifd": bool(ifd),
        "hidden_dim": int(hidden_dim),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
