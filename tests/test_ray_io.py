"""Ray Data over ingested shards: encode_rows == ChatEncoder, order preserved, columns kept."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pyarrow as pa
import pytest

from selectmoe.data.encoding import ChatEncoder, EncodingSpec
from selectmoe.data.ingest import ingest_pool, iter_ingested_records, list_shards

_EVAL = importlib.util.find_spec("olmo_eval")
NEOX_FILE = (
    Path(_EVAL.origin).parent / "tokenizers" / "allenai_gpt-neox-olmo-dolma-v1_5.json"
    if _EVAL
    else Path("/nonexistent")
)
pytestmark = pytest.mark.skipif(
    not NEOX_FILE.is_file(), reason="GPT-NeoX tokenizer file (olmo_eval) not installed"
)
SPEC = EncodingSpec(max_length=24, label_mode="assistant_only")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("rayio")
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(NEOX_FILE), eos_token="<|endoftext|>", pad_token="<|padding|>"
    )
    tok.save_pretrained(root / "tok")
    for f in range(2):
        lines = []
        for i in range(37):
            answer = " ".join(["word"] * (i % 9 + 1))  # some rows exceed max_length -> truncated
            m = [
                {"role": "user", "content": f"file {f} question {i}?"},
                {"role": "assistant", "content": answer},
            ]
            lines.append(json.dumps({"dataset": f"set{f}", "id": f"r{f}-{i:03d}", "messages": m}))
        (root / f"part{f}.jsonl").write_text("\n".join(lines) + "\n")
    ingest_pool([str(root / "part0.jsonl"), str(root / "part1.jsonl")], root / "ingest", chunk_rows=20)
    return root, tok


def test_encode_batch_direct(setup):
    from selectmoe.data.ray_io import EncodeBatch

    root, tok = setup
    table = pa.table(
        {
            "id": ["x"],
            "messages": [
                json.dumps([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
            ],
        }
    )
    out = EncodeBatch(str(root / "tok"), SPEC.to_dict())(table)
    assert out.schema.field("input_ids").type == pa.list_(pa.int32())
    assert (
        out.schema.field("n_tokens").type == pa.int32() and out.schema.field("truncated").type == pa.bool_()
    )
    ref = ChatEncoder(tok, SPEC).encode(
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    )
    assert out.column("input_ids").to_pylist() == [ref.input_ids] and out.column("labels").to_pylist() == [
        ref.labels
    ]


def test_read_and_encode_on_ray(ray_local, setup):
    from selectmoe.data.ray_io import encode_rows, read_ingested

    root, tok = setup
    ingest = root / "ingest"
    assert len(list_shards(ingest)) == 4  # 2 files x 2 chunks
    ds = read_ingested(ingest).map_batches(
        encode_rows,
        fn_kwargs={"tokenizer_dir": str(root / "tok"), "spec": SPEC.to_dict()},
        batch_format="pyarrow",
        batch_size=8,
    )
    rows = ds.take_all()
    records = list(iter_ingested_records(ingest))
    assert [r["id"] for r in rows] == [r["id"] for r in records]  # pool order
    enc = ChatEncoder(tok, SPEC)
    for got, rec in zip(rows, records):
        ref = enc.encode(rec["messages"])
        assert list(got["input_ids"]) == ref.input_ids and list(got["labels"]) == ref.labels
        assert got["n_tokens"] == ref.n_tokens and bool(got["truncated"]) == ref.truncated
        assert got["dataset"] == rec["dataset"] and got["source_line"] == rec["source_line"]
    assert any(r["truncated"] for r in rows) and not all(r["truncated"] for r in rows)

    one = read_ingested(ingest, shards=[str(list_shards(ingest)[2])]).take_all()
    assert [r["id"] for r in one] == [f"r1-{i:03d}" for i in range(20)]
