"""Truncation is not silent: per-dataset counts and one warning per mostly-truncated dataset."""

from __future__ import annotations

import logging

import pyarrow as pa

from selectmoe.data.truncation import truncation_summary

LONG, SHORT = 428, 34  # full token counts of the 200-word and the 3-word conversation


def test_a_long_dataset_gets_one_warning_the_short_one_none(caplog):
    """A tiny pool: ``sharegpt`` rows are long (39 of 40 cut), ``alpaca`` has 1 over-long row in 50 (2%)."""
    from selectmoe.data.encoding import ChatEncoder, EncodingSpec
    from selectmoe.model.tiny import train_bpe_tokenizer

    tok = train_bpe_tokenizer(["<|user|>\n a b <|assistant|>\n a a a"] * 4, vocab_size=60)
    encoder = ChatEncoder(tok, EncodingSpec(max_length=64))  # the real encoder sets the flags

    def conv(n_words: int):
        return [
            {"role": "user", "content": "a b"},
            {"role": "assistant", "content": " ".join(["a"] * n_words)},
        ]

    pool = [("sharegpt", conv(3 if i == 0 else 200)) for i in range(40)]
    pool += [("alpaca", conv(200 if i == 0 else 3)) for i in range(50)]
    encoded = encoder.encode_many([c for _, c in pool])
    table = pa.table(
        {
            "dataset": [d for d, _ in pool],
            "truncated": [e.truncated for e in encoded],
            "full_tokens": [e.full_tokens for e in encoded],
        }
    )
    long, short = encoded[1].full_tokens, encoded[0].full_tokens
    assert (long, short) == (LONG, SHORT) and encoded[1].n_tokens == 64  # cut at 64, 428 before
    with caplog.at_level(logging.WARNING, logger="selectmoe.data.truncation"):
        got = truncation_summary(
            "score", [table.slice(0, 50), table.slice(50)], 64, effect="their scores describe a prefix"
        )
    assert got["datasets"] == {
        "alpaca": {"rows": 50, "truncated": 1, "share": 0.02, "keep_length": SHORT},  # 49 of 50 are short
        "sharegpt": {"rows": 40, "truncated": 39, "share": 0.975, "keep_length": LONG},
    }
    line = (
        "score: 97.5% of sharegpt rows (39/40) truncated at 64 tokens; their scores describe a prefix "
        f"(max_length={LONG} keeps 90% of them whole)"
    )
    assert got["warnings"] == [line] and got["max_length"] == 64
    assert [r.getMessage() for r in caplog.records] == [line]
    assert truncation_summary("score", [], 64, effect="x") == {
        "max_length": 64,
        "datasets": {},
        "warnings": [],
    }
