"""Records, readers and ingest: every bad-row kind quarantined with the right file + line + reason."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selectmoe.cli import main
from selectmoe.data.ingest import (
    ensure_ingested,
    ingest_pool,
    iter_ingested_records,
    list_shards,
)
from selectmoe.data.readers import expand_inputs
from selectmoe.data.records import RecordError, normalize, stable_id
from selectmoe.manifest import read_manifest


def msgs(user="What is 2+2?", assistant="4."):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def row(**kw):
    return json.dumps(kw, ensure_ascii=False)


LONG = "x" * 300  # > max_chars=200 below
A_LINES = [
    row(dataset="d", id="a1", messages=msgs()),  # 1 valid
    '{"dataset": "d", "id": "a2", "messages": [',  # 2 broken_json
    "",  # 3 blank: not a row
    row(dataset="d", id="a4"),  # 4 missing_messages
    row(dataset="d", id="a5", messages=[]),  # 5 empty_messages
    row(id="a6", messages=[{"role": "robot", "content": "hi"}, *msgs()]),  # 6 unknown_role
    row(id="a7", messages=[{"role": "user", "content": 123}, {"role": "assistant", "content": "x"}]),  # 7
    row(id="a8", messages=msgs(assistant="   ")),  # 8 empty_content
    row(id="a9", messages=[{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}]),  # 9
    row(id="a10", messages=msgs()[:1]),  # 10 no_assistant_turn
    row(dataset="d", id="a1", messages=msgs("again", "dup")),  # 11 duplicate_id of line 1
    row(dataset="d", messages=msgs("no id here", "fine")),  # 12 valid, stable id
    row(dataset="d", id="a13", messages=msgs(LONG, "long")),  # 13 valid, flagged over_long
    None,  # 14 not UTF-8 (bytes written below)
    "[1, 2]",  # 15 not_an_object
    row(id="a16", messages="not a list"),  # 16 bad_message (a string that is not JSON)
]
EXPECTED_A = {
    2: "broken_json",
    4: "missing_messages",
    5: "empty_messages",
    6: "unknown_role",
    7: "non_string_content",
    8: "empty_content",
    9: "no_user_turn",
    10: "no_assistant_turn",
    11: "duplicate_id",
    14: "not_utf8",
    15: "not_an_object",
    16: "bad_message",
}


@pytest.fixture()
def pool(tmp_path: Path) -> Path:
    d = tmp_path / "pool"
    d.mkdir()
    data = b""
    for line in A_LINES:
        data += (b'{"id": "a14", "messages": "\xff\xfe"}' if line is None else line.encode()) + b"\n"
    (d / "a.jsonl").write_bytes(data)
    # b.json: an array cut off mid-element (a partial download)
    (d / "b.json").write_text(
        "[\n"
        + row(id="b1", messages=msgs("b one", "ok"))
        + ",\n"
        + row(id="b2", messages=msgs("b two", "ok"))
        + ',\n{"id": "b3", "messages": [{"role": "user", "cont'
    )
    # c.parquet: list<struct> messages; row 2 has no assistant; row 3 duplicates a.jsonl line 1's id
    mtype = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    table = pa.table(
        {
            "dataset": ["p", "p", "p"],
            "id": ["c1", "c2", "a1"],
            "messages": pa.array([msgs("c one", "ok"), msgs()[:1], msgs("c three", "ok")], mtype),
        }
    )
    pq.write_table(table, d / "c.parquet")
    (d / "notes.txt").write_text("ignored: not a pool suffix")
    return d


def _rejects(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]


def test_ingest_reports_every_bad_row(pool: Path, tmp_path: Path):
    out = tmp_path / "ingest"
    res = ingest_pool([str(pool)], out, max_chars=200)
    rej = _rejects(out)
    got = {(Path(r["file"]).name, r["line"]): r["reason"] for r in rej}
    want = {("a.jsonl", ln): reason for ln, reason in EXPECTED_A.items()}
    want[("b.json", 4)] = "truncated_json"
    want[("c.parquet", 2)] = "no_assistant_turn"
    want[("c.parquet", 3)] = "duplicate_id"
    assert got == want
    assert all(set(r) >= {"file", "line", "reason", "raw"} and len(r["raw"]) <= 500 for r in rej)
    dups = {r["line"]: r["detail"] for r in rej if r["reason"] == "duplicate_id"}
    assert dups[11].endswith("a.jsonl:1") and dups[3].endswith("a.jsonl:1")
    assert '"b3"' in next(r["raw"] for r in rej if r["reason"] == "truncated_json")

    assert res.n_valid == 3 + 2 + 1  # a: lines 1, 12, 13; b: b1, b2; c: c1
    assert res.n_read == res.n_valid + res.n_rejected == 6 + len(want)
    assert res.reject_reasons["duplicate_id"] == 2
    assert res.n_flagged == 1
    flagged = [json.loads(x) for x in (out / "flagged.jsonl").read_text().splitlines()]
    assert flagged == [
        {
            "file": str(pool / "a.jsonl"),
            "line": 13,
            "id": "a13",
            "reason": "over_long",
            "n_chars": 304,
            "max_chars": 200,
        }
    ]

    # shards: one per input file, sorted = pool order, canonical columns
    assert [p.name for p in list_shards(out)] == [
        "00000-a-00000.parquet",
        "00001-b-00000.parquet",
        "00002-c-00000.parquet",
    ]
    assert res.shards == [str(p) for p in list_shards(out)]
    t = pq.read_table(list_shards(out)[0])
    assert t.column_names == ["id", "dataset", "messages", "source_file", "source_line"]
    records = list(iter_ingested_records(out))
    sid = stable_id("d", msgs("no id here", "fine"))
    assert [r["id"] for r in records] == ["a1", sid, "a13", "b1", "b2", "c1"]
    assert [r["source_line"] for r in records] == [1, 12, 13, 2, 3, 1]
    assert records[0]["messages"] == msgs() and records[0]["dataset"] == "d"
    assert [r["dataset"] for r in records[3:]] == ["b", "b", "p"]  # missing dataset -> file stem

    man = read_manifest(out)
    assert man["stage"] == "ingest"
    assert man["counts"]["n_valid"] == 6 and man["counts"]["reject_reasons"]["truncated_json"] == 1
    assert sorted(Path(k).name for k in man["inputs"]) == ["a.jsonl", "b.json", "c.parquet"]


def test_strict_fails_at_first_bad_row(pool: Path, tmp_path: Path):
    out = tmp_path / "strict"
    with pytest.raises(ValueError, match=r"a\.jsonl:2: broken_json"):
        ingest_pool([str(pool / "a.jsonl")], out, strict=True)
    assert list_shards(out) == [] and not (out / "_manifest.json").exists()


def test_ensure_ingested_skips_then_reingests(pool: Path, tmp_path: Path):
    out = tmp_path / "ing"
    first = ensure_ingested([str(pool)], out, fmt="auto", strict=False)
    again = ensure_ingested([str(pool)], out, fmt="auto", strict=False)
    assert not first.skipped and again.skipped
    assert again.summary()["n_valid"] == first.n_valid and again.shards == first.shards
    with (pool / "b.json").open("a") as fh:
        fh.write("\n")  # content changed -> fingerprint changed
    third = ensure_ingested([str(pool)], out, fmt="auto", strict=False)
    assert not third.skipped and third.n_valid == first.n_valid


def test_chunking_and_single_object_json(tmp_path: Path):
    f = tmp_path / "many.jsonl"
    f.write_text("".join(row(id=f"m{i}", messages=msgs(f"q{i}", "a")) + "\n" for i in range(5)))
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"id": "solo", "messages": msgs()}, indent=2))
    res = ingest_pool([str(f), str(one)], tmp_path / "out", chunk_rows=2)
    names = [p.name for p in list_shards(tmp_path / "out")]
    assert names == [
        "00000-many-00000.parquet",
        "00000-many-00001.parquet",
        "00000-many-00002.parquet",
        "00001-one-00000.parquet",
    ]
    assert [r["id"] for r in iter_ingested_records(tmp_path / "out")] == [
        "m0",
        "m1",
        "m2",
        "m3",
        "m4",
        "solo",
    ]
    assert res.n_rejected == 0


def test_expand_inputs_globs_dirs_uris(pool: Path):
    names = lambda srcs: [Path(s.name.removeprefix("file://")).name for s in srcs]  # noqa: E731
    assert names(expand_inputs(str(pool))) == ["a.jsonl", "b.json", "c.parquet"]
    assert names(expand_inputs(str(pool / "*.json*"))) == ["a.jsonl", "b.json"]
    uri = expand_inputs(f"file://{pool}")
    assert names(uri) == ["a.jsonl", "b.json", "c.parquet"] and uri[0].name.startswith("file://")
    assert expand_inputs(f"file://{pool}/a.jsonl")[0].name == f"file://{pool}/a.jsonl"
    with pytest.raises(FileNotFoundError):
        expand_inputs(str(pool / "nope.jsonl"))


def test_ingest_from_uri_matches_local(pool: Path, tmp_path: Path):
    local = ingest_pool([str(pool)], tmp_path / "l", max_chars=200)
    remote = ingest_pool([f"file://{pool}"], tmp_path / "r", max_chars=200)
    assert remote.summary()["reject_reasons"] == local.summary()["reject_reasons"]
    assert [r["id"] for r in iter_ingested_records(tmp_path / "r")] == [
        r["id"] for r in iter_ingested_records(tmp_path / "l")
    ]


def test_adapters_and_stable_id():
    share = {
        "conversations": [
            {"from": "system", "value": ""},
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "yo"},
        ]
    }
    rec = normalize(share, default_dataset="src")
    assert rec == {
        "dataset": "src",
        "id": None,
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
    }
    alpaca = {"instruction": "Add.", "input": "2 and 3", "output": "5", "dataset": "alp", "id": 7}
    rec = normalize(alpaca, fmt="alpaca")
    assert rec["id"] == "7" and rec["dataset"] == "alp"
    assert rec["messages"] == [
        {"role": "user", "content": "Add.\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    assert normalize({"instruction": "Say hi.", "output": "hi"})["messages"][0] == {
        "role": "user",
        "content": "Say hi.",
    }
    with pytest.raises(RecordError) as err:
        normalize({"conversations": [{"from": "bot", "value": "x"}]})
    assert err.value.reason == "unknown_role"
    with pytest.raises(RecordError) as err:
        normalize({"messages": msgs()}, fmt="sharegpt")  # forced format
    assert err.value.reason == "missing_messages"

    a = stable_id("d", msgs())
    assert a == stable_id("d", [{"role": "user", "content": "What is 2+2?", "extra": 1}, msgs()[1]])
    assert len(a) == 16 and int(a, 16) >= 0
    assert a != stable_id("e", msgs()) and a != stable_id("d", msgs(assistant="5."))


def test_validate_cli(pool: Path, tmp_path: Path, capsys):
    out = tmp_path / "val"
    assert main(["validate", str(pool / "a.jsonl"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "broken_json: 1" in printed and "duplicate_id: 1" in printed
    assert len(_rejects(out)) == len(EXPECTED_A)
    assert main(["validate", str(pool / "a.jsonl"), "--out", str(out), "--strict"]) == 2
    assert "a.jsonl:2: broken_json" in capsys.readouterr().err
    assert main(["validate", str(pool / "b.json"), "--out", str(out), "--format", "messages"]) == 0
    assert [r["reason"] for r in _rejects(out)] == ["truncated_json"]
