"""Pool readers: linear streaming JSON with exact lines, compressed and binary inputs, nothing silent."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import logging
import lzma
from pathlib import Path

import pytest
from fsspec.compression import compr

from selectmoe.data.ingest import ensure_ingested, ingest_pool, iter_ingested_records, validate_main
from selectmoe.data.readers import JsonStreamReader, Source, expand_inputs
from selectmoe.manifest import fingerprint


def msgs(user: str, assistant: str = "ok") -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


ROWS = [{"id": f"r{i}", "messages": msgs(f"question {i}")} for i in range(5)]


def _rejects(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- streaming JSON
def test_json_array_20k_rows_linear_with_exact_lines():
    """20k indented rows read in 64 KiB chunks: every row and its start line exact, each character
    scanned once (linear work) and the buffer never more than a chunk plus one row."""
    rows = [{"id": f"s{i}", "messages": msgs("q" * (i % 97), "a" * (i % 13 + 1))} for i in range(20_000)]
    parts, starts, line = ["[\n"], [], 2
    for i, r in enumerate(rows):
        text = json.dumps(r, indent=2)
        starts.append(line)
        parts.append(text + (",\n" if i < len(rows) - 1 else "\n"))
        line += text.count("\n") + 1
    parts.append("]\n")
    text = "".join(parts)
    reader = JsonStreamReader(io.BytesIO(text.encode()), chunk_size=64 * 1024)
    got = list(reader.rows())
    assert [r.obj for r in got] == rows
    assert [r.line for r in got] == starts
    assert starts[:3] == [2, 15, 28] and starts[-1] == 259_989
    assert reader.scanned == len(text)  # no rescans: the old reader counted O(rows x file) characters
    longest = max(len(json.dumps(r, indent=2)) for r in rows)
    assert reader.peak_buffer <= 64 * 1024 + longest + 2


def test_json_row_of_many_chunks_and_tails():
    big = {"id": "big", "messages": msgs("x" * 100_000)}
    data = json.dumps([{"id": "a", "messages": msgs("a")}, big]).encode()
    reader = JsonStreamReader(io.BytesIO(data), chunk_size=4096)
    assert [r.obj["id"] for r in reader.rows()] == ["a", "big"]
    assert reader.peak_buffer < 4 * len(data)  # read size doubles while one row is incomplete

    def kinds(raw: bytes) -> list[tuple[int, str | None, str]]:
        return [(r.line, r.error, r.detail) for r in JsonStreamReader(io.BytesIO(raw), chunk_size=3).rows()]

    assert kinds(b"[1, 23,\n 456]") == [(1, None, ""), (1, None, ""), (2, None, "")]  # numbers across chunks
    assert kinds(b'[{"a": 1},\n{"b": "cut') == [
        (1, None, ""),
        (2, "truncated_json", "Unterminated string starting at"),
    ]
    assert kinds(b'[{"a": 1},\n{bad}, {"c": 3}]')[1][:2] == (2, "broken_json")
    tail = b", ".join([json.dumps({"id": f"t{i}", "messages": msgs("x" * 50)}).encode() for i in range(5000)])
    broken = JsonStreamReader(io.BytesIO(b'[{"a": 1},\n{bad}, ' + tail + b"]"), chunk_size=4096)
    assert [(r.line, r.error) for r in broken.rows()] == [(1, None), (2, "broken_json")]
    assert broken.bytes_read == 4096  # reported from the first chunk of a 700 kB file
    assert kinds(b'[{"a": 1}]\nextra')[1] == (2, "broken_json", "data after the array")
    assert kinds(b'[{"a": 1}\n') == [(1, None, ""), (2, "truncated_json", "array not closed")]
    assert kinds(b'{"a": 1}\n\n{"b": 2}') == [(1, None, ""), (3, None, "")]  # concatenated objects
    assert kinds(b'[{"a": "\xff"}]') == [(1, "not_utf8", "invalid UTF-8 byte at offset 8 of the file")]


def test_json_line_is_the_text_line_in_rejects_and_shards(tmp_path: Path):
    pool = tmp_path / "p.json"
    pool.write_text(
        "[\n"
        + json.dumps(ROWS[0], indent=2)
        + ",\n"
        + json.dumps({"id": "bad", "messages": []}, indent=2)
        + ",\n"
        + json.dumps(ROWS[1], indent=2)
        + "\n]\n"
    )
    res = ingest_pool([str(pool)], tmp_path / "out")
    assert [(r["line"], r["reason"]) for r in _rejects(tmp_path / "out")] == [(15, "empty_messages")]
    assert [(r["id"], r["source_line"]) for r in iter_ingested_records(tmp_path / "out")] == [
        ("r0", 2),
        ("r1", 19),
    ]
    assert (res.n_read, res.n_valid) == (3, 2)


# --------------------------------------------------------------------------- compressed and binary
@pytest.mark.parametrize(
    ("name", "pack"),
    [("a.jsonl.gz", gzip.compress), ("a.jsonl.bz2", bz2.compress), ("a.json.xz", lzma.compress)],
)
def test_compressed_inputs_read_as_their_content(tmp_path: Path, name: str, pack):
    raw = json.dumps(ROWS).encode() if ".json." in name else jsonl(ROWS)
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / name).write_bytes(pack(raw))
    res = ingest_pool([str(tmp_path / "pool")], tmp_path / "out")
    assert (res.n_read, res.n_valid, res.n_rejected) == (5, 5, 0)
    assert [Path(s).name for s in res.shards] == ["00000-a-00000.parquet"]
    assert [r["id"] for r in iter_ingested_records(tmp_path / "out")] == [r["id"] for r in ROWS]
    assert [r["dataset"] for r in iter_ingested_records(tmp_path / "out")] == ["a"] * 5
    by_name = ingest_pool([str(tmp_path / "pool" / name)], tmp_path / "out2")  # named, not found in a dir
    assert (by_name.n_valid, by_name.n_rejected) == (5, 0)


def test_compression_refused_by_name(tmp_path: Path):
    zst = tmp_path / "a.jsonl.zst"
    zst.write_bytes(b"(\xb5/\xfd")
    if "zstd" in compr:
        pytest.skip("zstandard is installed: .zst is read like .gz")
    with pytest.raises(ValueError, match=r"a\.jsonl\.zst: zstd-compressed.*pip install zstandard"):
        expand_inputs(str(zst))
    pq_gz = tmp_path / "b.parquet.gz"
    pq_gz.write_bytes(gzip.compress(b"PAR1"))
    with pytest.raises(ValueError, match=r"b\.parquet\.gz: Parquet compresses its pages itself"):
        expand_inputs(str(pq_gz))


def test_binary_and_misnamed_files_are_one_rejection(tmp_path: Path, caplog):
    (tmp_path / "gz.jsonl").write_bytes(gzip.compress(jsonl(ROWS * 200)))  # compressed, plain name
    (tmp_path / "bin.jsonl").write_bytes(b'{"a": 1}\n' + bytes(range(256)) * 64)
    (tmp_path / "u16.json").write_bytes(json.dumps(ROWS).encode("utf-16"))
    broken = gzip.compress(jsonl([{"messages": msgs(f"q {i} " * 20)} for i in range(2000)]))
    (tmp_path / "cut.jsonl.gz").write_bytes(broken[: len(broken) // 2])  # an unreadable (cut) archive
    with caplog.at_level(logging.WARNING):
        res = ingest_pool(
            [str(tmp_path / n) for n in ("gz.jsonl", "bin.jsonl", "u16.json", "cut.jsonl.gz")], tmp_path / "o"
        )
    got = [(Path(r["file"]).name, r["line"], r["reason"], r["detail"][:40]) for r in _rejects(tmp_path / "o")]
    cut = [g for g in got if g[0] == "cut.jsonl.gz"]
    assert got[:3] == [
        ("gz.jsonl", 0, "binary_file", "gzip data, not text (name it *.jsonl.gz "),
        ("bin.jsonl", 0, "binary_file", "binary file: NUL byte at offset 9"),
        ("u16.json", 0, "binary_file", "UTF-16 text, not UTF-8 (convert it: icon"),
    ]
    # the readable first half of the cut archive is kept; the rest is one read_error for the file
    assert [(g[1], g[2]) for g in cut] == [(0, "read_error")]
    assert res.n_valid == 968  # the rows before the cut (2,000 written, half the archive kept)
    assert res.n_read == res.n_valid + 4
    warned = [r.getMessage() for r in caplog.records if "pool file not read" in r.getMessage()]
    assert len(warned) == 4 and "gz.jsonl:0: binary_file" in warned[0]
    with pytest.raises(ValueError, match=r"gz\.jsonl:0: binary_file"):
        ingest_pool([str(tmp_path / "gz.jsonl")], tmp_path / "s", strict=True)


# --------------------------------------------------------------------------- nothing silent
def test_empty_files_warn_or_fail_under_strict(tmp_path: Path, caplog):
    (tmp_path / "e.jsonl").write_bytes(b"\n\n")
    (tmp_path / "e.json").write_text("[ ]\n")
    with caplog.at_level(logging.WARNING):
        res = ingest_pool([str(tmp_path / "e.jsonl"), str(tmp_path / "e.json")], tmp_path / "o")
    assert res.n_read == 0
    assert sorted(r.getMessage() for r in caplog.records) == [
        f"pool file {tmp_path / 'e.json'} is empty (no rows)",
        f"pool file {tmp_path / 'e.jsonl'} is empty (no rows)",
    ]
    with pytest.raises(ValueError, match=r"e\.jsonl is empty \(no rows\) \(data\.strict=true\)"):
        ingest_pool([str(tmp_path / "e.jsonl")], tmp_path / "s", strict=True)
    assert validate_main([str(tmp_path / "e.json")], tmp_path / "v", strict=True) == 2


def test_skipped_directory_files_are_named(tmp_path: Path, caplog):
    d = tmp_path / "pool"
    (d / "_logs").mkdir(parents=True)
    (d / "a.jsonl").write_bytes(jsonl(ROWS))
    for name in ("_SUCCESS", ".a.jsonl.swp", "notes.txt", "_logs/b.jsonl", "c.jsonl.zip"):
        (d / name).write_text("x")
    with caplog.at_level(logging.WARNING):
        assert [Path(s.name).name for s in expand_inputs(str(d))] == ["a.jsonl"]
    (msg,) = [r.getMessage() for r in caplog.records]
    assert msg.startswith(f"pool input {d}: skipped 5 file(s) that are not pool data: ")
    assert [Path(p).name for p in msg.split(": ")[-1].split(", ")] == [
        ".a.jsonl.swp",
        "_SUCCESS",
        "b.jsonl",
        "c.jsonl.zip",
        "notes.txt",
    ]
    with pytest.raises(ValueError, match=r"skipped 5 file\(s\).*\(data\.strict=true\)"):
        expand_inputs(str(d), strict=True)


def test_fingerprint_notices_a_same_size_edit_in_the_middle(tmp_path: Path):
    big = tmp_path / "big.jsonl"  # past the old 64 MiB head+tail limit
    with big.open("wb") as fh:
        fh.truncate(65 * 1024 * 1024)
    before = fingerprint(big)
    with big.open("r+b") as fh:
        fh.seek(40 * 1024 * 1024)
        fh.write(b"x")
    after = fingerprint(big)
    assert before["size"] == after["size"] and before["sha256"] != after["sha256"]
    assert after["method"] == "sha256"

    pool = tmp_path / "p.jsonl"
    pool.write_bytes(jsonl(ROWS))
    assert not ensure_ingested([str(pool)], tmp_path / "o").skipped
    assert ensure_ingested([str(pool)], tmp_path / "o").skipped
    pool.write_bytes(jsonl(ROWS).replace(b"question 2", b"question 9"))  # same size, middle row
    again = ensure_ingested([str(pool)], tmp_path / "o")
    assert not again.skipped
    assert [m["messages"][0]["content"] for m in iter_ingested_records(tmp_path / "o")][2] == "question 9"


def test_stable_ids_under_rename(tmp_path: Path):
    """Ids hash dataset + messages (DESIGN); the dataset defaults to the file stem, so a rename changes
    the ids unless the rows carry ``dataset`` or the input sets it with ``#dataset=NAME``."""
    no_ids = jsonl([{"messages": msgs(f"question {i}")} for i in range(2)])
    old, new = tmp_path / "dolly_v1.jsonl", tmp_path / "dolly_v2.jsonl"
    old.write_bytes(no_ids)
    new.write_bytes(no_ids)

    def ids(spec: str, out: str) -> list[tuple[str, str]]:
        ingest_pool([spec], tmp_path / out)
        return [(r["dataset"], r["id"]) for r in iter_ingested_records(tmp_path / out)]

    by_stem_old, by_stem_new = ids(str(old), "o1"), ids(str(new), "o2")
    assert [d for d, _ in by_stem_old] == ["dolly_v1"] * 2 and [d for d, _ in by_stem_new] == ["dolly_v2"] * 2
    assert {i for _, i in by_stem_old}.isdisjoint(i for _, i in by_stem_new)
    named_old, named_new = ids(f"{old}#dataset=dolly", "o3"), ids(f"{new}#dataset=dolly", "o4")
    assert named_old == named_new and [d for d, _ in named_old] == ["dolly", "dolly"]
    assert Source(str(new), "dolly").stem == "dolly_v2"
    with pytest.raises(ValueError, match="empty name after '#dataset='"):
        expand_inputs(f"{new}#dataset=")


def test_validate_and_ingest_progress_bar(tmp_path: Path, capsys):
    pool = tmp_path / "p.jsonl"
    pool.write_bytes(jsonl(ROWS))
    ingest_pool([str(pool)], tmp_path / "o", progress=True)
    err = capsys.readouterr().err
    assert "validate: " in err and "5 rows" in err and "rows/s" in err and "p.jsonl" in err
    ingest_pool([str(pool)], tmp_path / "o2")  # None: only on a terminal (pytest's stderr is not one)
    assert capsys.readouterr().err == ""


def test_json_every_chunk_boundary_matches_json_loads():
    """Tokens, escapes and multi-byte UTF-8 cut at every possible place still parse as json.loads does."""
    values = [
        1.5e10,
        -0.25,
        True,
        False,
        None,
        "é✓ \u0041\\n",
        {"k": [1, {"z": "日本"}]},
        12345678901234567890,
    ]
    text = "[" + ",\n ".join(json.dumps(v, ensure_ascii=False) for v in values) + "]"
    data = ("\ufeff" + text).encode()
    for chunk in range(1, 40):
        got = [(r.line, r.obj) for r in JsonStreamReader(io.BytesIO(data), chunk_size=chunk).rows()]
        assert got == list(zip(range(1, 9), values)), chunk
