"""docs/data-formats.md matches the code: the reason table, the ShareGPT role mapping, ids like 5 and ""."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

from selectmoe.data.ingest import ingest_pool, iter_ingested_records
from selectmoe.data.records import REASONS, SHAREGPT_ROLES, normalize, stable_id

DOC = Path(__file__).resolve().parents[1] / "docs" / "data-formats.md"
M = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]


def _doc_reasons() -> list[str]:
    text = DOC.read_text()
    table = text[text.index("| reason | when |") :].split("\n\n", 1)[0]
    return re.findall(r"^\| `([a-z_0-9]+)` \|", table, flags=re.M)


def test_reason_table_lists_exactly_the_reasons_ingest_emits(tmp_path: Path):
    """One input per reason, through a real ingest: the emitted set == REASONS == the doc's table."""
    rows = [
        '{"messages": [',  # broken_json
        '"a string"',  # not_an_object
        '{"text": "x"}',  # missing_messages
        '{"messages": []}',  # empty_messages
        '{"messages": [1]}',  # bad_message
        json.dumps({"messages": [{"role": "bot", "content": "x"}, *M]}),  # unknown_role
        json.dumps({"messages": [{"role": "user", "content": 5}, M[1]]}),  # non_string_content
        json.dumps({"messages": [{"role": "user", "content": " "}, M[1]]}),  # empty_content
        json.dumps({"messages": [M[1]]}),  # no_user_turn
        json.dumps({"messages": [M[0]]}),  # no_assistant_turn
        json.dumps({"id": 1.5, "messages": M}),  # bad_id
        json.dumps({"dataset": 3, "messages": M}),  # bad_dataset
        json.dumps({"id": "x", "messages": M}),
        json.dumps({"id": "x", "messages": M}),  # duplicate_id
    ]
    (tmp_path / "a.jsonl").write_bytes("\n".join(rows).encode() + b"\n\xff\n")  # not_utf8
    (tmp_path / "b.json").write_text('[{"messages": ')  # truncated_json
    (tmp_path / "c.jsonl").write_bytes(b"\x00\x01 binary")  # binary_file
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(b"{}\n")[:12])  # read_error
    res = ingest_pool(
        [str(tmp_path / n) for n in ("a.jsonl", "b.json", "c.jsonl", "d.jsonl.gz")], tmp_path / "o"
    )
    assert res.n_valid == 1 and res.n_rejected == len(REASONS)
    assert set(res.reject_reasons) == set(REASONS)
    assert sorted(_doc_reasons()) == sorted(REASONS)


def test_doc_role_mapping_is_the_code_mapping():
    line = next(ln for ln in DOC.read_text().splitlines() if ln.startswith("ShareGPT `from` values map"))
    mapping = {}
    for group in line.split(":", 1)[1].rstrip(".").split(";"):
        names, role = group.split("→")
        mapping.update({n: role.strip() for n in re.findall(r"`(\w+)`", names)})
    assert mapping == SHAREGPT_ROLES
    got = normalize({"conversations": [{"from": "Human", "value": "q"}, {"from": "BARD", "value": "a"}]})
    assert [m["role"] for m in got["messages"]] == ["user", "assistant"]


def test_ids_5_and_empty_as_documented(tmp_path: Path):
    assert normalize({"id": 5, "messages": M})["id"] == "5"
    assert normalize({"id": "", "messages": M})["id"] is None  # -> stable id at ingest
    assert normalize({"id": "  ", "messages": M})["id"] is None
    (tmp_path / "p.jsonl").write_text(
        json.dumps({"id": 5, "messages": M}) + "\n" + json.dumps({"id": "", "messages": M})
    )
    ingest_pool([str(tmp_path / "p.jsonl")], tmp_path / "o")
    assert [r["id"] for r in iter_ingested_records(tmp_path / "o")] == ["5", stable_id("p", M)]
    assert stable_id("p", M) == "14cc8f574408e2b4"
