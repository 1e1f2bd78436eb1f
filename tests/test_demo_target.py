"""The demo's finetune target: pre-trained briefly on the held-out clean corpus, reproducibly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

# first loss and mean of the last 10 of 12 seeded steps (deterministic CPU kernels, 2 threads)
PINNED_TARGET_LOSSES = (5.732, 4.5111)


def _assets(root: Path) -> None:
    """The two inputs the target needs: the clean pre-training corpus and the tokenizer."""
    from selectmoe.data.demo_pool import build_demo_pool
    from selectmoe.demo import _read_records
    from selectmoe.model.tiny import train_bpe_tokenizer

    corpus = build_demo_pool(
        root / "pretrain_corpus", n_clean=70, bad_fraction=0.0, seed=1, parquet_fraction=0
    )
    texts = [m["content"] for r in _read_records(corpus.paths) for m in r["messages"]]
    train_bpe_tokenizer(texts, vocab_size=300).save_pretrained(root / "tokenizer")


@pytest.mark.pinned
def test_target_pretrained_and_eval_written(tmp_path: Path):
    from transformers import AutoModelForCausalLM

    from selectmoe.config import DemoConfig
    from selectmoe.demo import rebuild_demo_target

    _assets(tmp_path)
    cfg = DemoConfig(dir=str(tmp_path), n_eval=14, target_pretrain_steps=12, pretrain_batch_size=8)
    first, last = rebuild_demo_target(cfg, seed=0)
    assert (round(first, 4), round(last, 4)) == PINNED_TARGET_LOSSES
    assert last < first - 1.0  # it learned something of the demo text
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny_target")
    assert model.config.num_hidden_layers == 2
    assert (tmp_path / "tasks" / "selectmoe_demo.yaml").is_file()
    rows = [json.loads(x) for x in (tmp_path / "eval" / "demo_eval.jsonl").read_text().splitlines()]
    assert len(rows) == 14 and all(r["choices"][r["answer"]].endswith(".") for r in rows)
    # 0 steps: the target stays as initialised
    assert all(
        math.isnan(v) for v in rebuild_demo_target(DemoConfig(dir=str(tmp_path), target_pretrain_steps=0))
    )
