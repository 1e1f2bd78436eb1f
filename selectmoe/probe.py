"""``selectmoe probe``: the quality probe (:mod:`selectmoe.scoring.probe`) on a model and a pool of files."""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Sequence
from typing import Any

from selectmoe.scoring.probe import build_probe_set, probe


def _sample_records(records: list[dict[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    if n >= len(records):
        return records
    return random.Random(seed).sample(records, n)


def probe_main(
    model_dir: str,
    pool: Sequence[str],
    *,
    n: int = 64,
    seed: int = 42,
    batch_size: int = 16,
    fmt: str = "auto",
) -> int:
    """``selectmoe probe MODEL_DIR POOL... [--n N] [--seed S] [--batch-size B]``: prints the probe JSON.

    MODEL_DIR is a selector artefact or a converted Select-MoE directory; POOL are instruction files (any
    format ingest accepts), validated into a temporary directory; ``n`` clean samples are drawn with ``seed``.
    """
    import tempfile

    import torch

    from selectmoe.data.encoding import ChatEncoder, EncodingSpec
    from selectmoe.data.ingest import ensure_ingested, iter_ingested_records
    from selectmoe.model import load_selector

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer, encoding = load_selector(
        model_dir, dtype=torch.bfloat16 if device == "cuda" else None, device=device
    )
    encoder = ChatEncoder(tokenizer, EncodingSpec.from_dict(encoding or None))
    with tempfile.TemporaryDirectory(prefix="selectmoe-probe-") as tmp:
        ensure_ingested(list(pool), tmp, fmt=fmt, strict=False)
        records = [{"id": r["id"], "messages": r["messages"]} for r in iter_ingested_records(tmp)]
    if not records:
        print(json.dumps({"error": "no valid records in the pool"}), file=sys.stderr)
        return 2
    chosen = _sample_records(records, n, seed)
    result = probe(model, encoder, build_probe_set(chosen, seed=seed), batch_size=batch_size)
    result.update(model_dir=str(model_dir), seed=seed)
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


__all__ = ["probe_main"]
