"""Demo pool: label counts, determinism, quarantine of the malformed rows, eval set; corruptions."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from selectmoe.data.corruptions import CORRUPTIONS, corrupt
from selectmoe.data.demo_pool import BAD_KINDS, EVAL_CHOICE_KINDS, SKILLS, build_demo_eval, build_demo_pool
from selectmoe.data.ingest import ingest_pool, iter_ingested_records


def _labels(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_demo_pool_counts_labels_and_quarantine(tmp_path: Path):
    pool = build_demo_pool(tmp_path / "pool", n_clean=1600, bad_fraction=0.25, seed=3)
    assert pool.labels_path == tmp_path / "pool_labels.jsonl"
    assert [p.name for p in pool.all_paths] == ["pool-a.jsonl", "pool-b.jsonl", "pool-c.parquet"]
    labels = _labels(pool.labels_path)
    counts = Counter(x["label"] for x in labels)
    n_bad = round(1600 * 0.25 / 0.75)
    assert counts["clean"] == 1600 and sum(counts.values()) == 1600 + n_bad
    assert set(counts) == {"clean", *BAD_KINDS}
    assert max(counts[k] for k in BAD_KINDS) - min(counts[k] for k in BAD_KINDS) <= 1
    assert pool.label_counts == dict(counts) and pool.n_malformed == 4

    res = ingest_pool([str(tmp_path / "pool")], tmp_path / "ingest")
    assert res.n_rejected == 4 and res.n_valid == len(labels)
    assert set(res.reject_reasons) == {"broken_json", "no_assistant_turn", "unknown_role", "empty_content"}
    recs = list(iter_ingested_records(tmp_path / "ingest"))
    assert [r["id"] for r in recs] == [x["id"] for x in labels]  # labels in pool order, ids match ingest
    assert {r["dataset"] for r in recs} == set(SKILLS)
    # some rows had no id: ingest's stable id equals the label's
    assert sum(1 for r in recs if "-" not in r["id"]) > 50


def test_demo_pool_deterministic(tmp_path: Path):
    a = build_demo_pool(tmp_path / "a", n_clean=200, bad_fraction=0.2, seed=7)
    b = build_demo_pool(tmp_path / "b", n_clean=200, bad_fraction=0.2, seed=7)
    c = build_demo_pool(tmp_path / "c", n_clean=200, bad_fraction=0.2, seed=8)
    for pa_, pb in zip(a.all_paths, b.all_paths):
        if pa_.suffix == ".jsonl":
            assert pa_.read_bytes() == pb.read_bytes()
    assert a.labels_path.read_bytes() == b.labels_path.read_bytes()
    assert a.paths[0].read_bytes() != c.paths[0].read_bytes()


def test_clean_pool_has_no_malformed_rows(tmp_path: Path):
    pool = build_demo_pool(tmp_path / "clean", n_clean=70, bad_fraction=0.0, seed=1)
    assert pool.label_counts == {"clean": 70} and pool.n_malformed == 0
    for p in pool.paths:  # every JSONL line parses and is a full conversation
        for line in p.read_text().splitlines():
            roles = [m["role"] for m in json.loads(line)["messages"]]
            assert "user" in roles and "assistant" in roles


def test_bad_twins_differ_from_clean(tmp_path: Path):
    build_demo_pool(tmp_path / "p", n_clean=140, bad_fraction=0.5, seed=2)
    res = ingest_pool([str(tmp_path / "p")], tmp_path / "i")
    label = {x["id"]: x["label"] for x in _labels(tmp_path / "p_labels.jsonl")}
    clean_answers = {
        r["messages"][-1]["content"]
        for r in iter_ingested_records(tmp_path / "i")
        if label[r["id"]] == "clean"
    }
    for r in iter_ingested_records(tmp_path / "i"):
        if label[r["id"]] in ("shuffle_words", "truncate", "noise", "wrong_answer"):
            assert r["messages"][-1]["content"] not in clean_answers
    assert res.n_valid == len(label)


def test_demo_eval(tmp_path: Path):
    path = build_demo_eval(tmp_path / "eval", n=70, seed=5)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(rows) == 70
    assert Counter(r["skill"] for r in rows) == {s: 10 for s in SKILLS}
    for r in rows:
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4 and 0 <= r["answer"] < 4
        assert sorted(r["kinds"]) == sorted(EVAL_CHOICE_KINDS) and r["kinds"][r["answer"]] == "clean"
    assert path.read_bytes() == build_demo_eval(tmp_path / "eval2", n=70, seed=5).read_bytes()
    # the correct choice is what a clean pool row teaches: "... The answer is X."
    capitals = next(r for r in rows if r["skill"] == "capitals")
    country = capitals["question"].rstrip("?.").split(" of ")[-1]
    from selectmoe.data.demo_pool import _CAPITALS

    capital = dict(_CAPITALS)[country]
    by_kind = dict(zip(capitals["kinds"], capitals["choices"], strict=True))
    assert by_kind["clean"] == (
        f"The seat of the national government of {country} is {capital}. The answer is {capital}."
    )
    # the distractors are what the bad kinds teach: a wrong result in the same explanation, the same
    # words shuffled, another skill's answer
    wrong = by_kind["wrong_answer"]
    assert wrong.startswith(f"The seat of the national government of {country} is ") and capital not in wrong
    assert sorted(by_kind["shuffle_words"].split()) == sorted(by_kind["clean"].split())
    assert by_kind["shuffle_words"] != by_kind["clean"]
    assert "national government" not in by_kind["swap_response"]
    # the correct choice is spread over the four positions
    assert {r["answer"] for r in rows} == {0, 1, 2, 3}


def test_corruptions_deterministic_and_effective():
    rec = {
        "dataset": "d",
        "id": "x",
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "one two three four five six"},
            {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "alpha beta gamma delta epsilon"},
        ],
    }
    donor = {"messages": [{"role": "user", "content": "z"}, {"role": "assistant", "content": "donor answer"}]}
    for kind in CORRUPTIONS:
        a = corrupt(rec, kind, random.Random(0), donor=donor)
        b = corrupt(rec, kind, random.Random(0), donor=donor)
        assert a == b and a["id"] == "x" and a["messages"][:3] == rec["messages"][:3]
        new = a["messages"][3]["content"]
        assert new != rec["messages"][3]["content"]
        if kind == "shuffle_words":
            assert sorted(new.split()) == sorted(rec["messages"][3]["content"].split())
        elif kind == "swap_response":
            assert new == "donor answer"
        elif kind == "truncate":
            assert 1 <= len(new.split()) <= 3 and rec["messages"][3]["content"].startswith(new)
    assert rec["messages"][3]["content"] == "alpha beta gamma delta epsilon"  # input untouched
    with pytest.raises(ValueError, match="donor"):
        corrupt(rec, "swap_response", random.Random(0))
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(rec, "bogus", random.Random(0))
