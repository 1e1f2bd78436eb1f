"""``selectmoe probe``: the quality probe (:mod:`selectmoe.scoring.probe`) on a model and a pool of files."""

from __future__ import annotations

import argparse
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


def probe_main(argv: Sequence[str] | None = None) -> int:
    """``selectmoe probe MODEL_DIR POOL... [--n N] [--seed S] [--batch-size B]``: prints the probe JSON.

    MODEL_DIR is a selector artefact or a converted Select-MoE directory; POOL are instruction files (any
    format ingest accepts), validated into a temporary directory; ``n`` clean samples are drawn with ``seed``.
    """
    import tempfile

    import torch

    from selectmoe.data.encoding import ChatEncoder, EncodingSpec
    from selectmoe.data.ingest import ensure_ingested, iter_ingested_records
    from selectmoe.model import load_selector

    parser = argparse.ArgumentParser(prog="selectmoe probe", description=probe_main.__doc__)
    parser.add_argument("model_dir")
    parser.add_argument("pool", nargs="+")
    parser.add_argument("--n", type=int, default=64, help="clean samples (default 64)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--format", default="auto")
    args = parser.parse_args(list(argv) if argv is not None else None)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer, encoding = load_selector(
        args.model_dir, dtype=torch.bfloat16 if device == "cuda" else None, device=device
    )
    encoder = ChatEncoder(tokenizer, EncodingSpec.from_dict(encoding or None))
    with tempfile.TemporaryDirectory(prefix="selectmoe-probe-") as tmp:
        ensure_ingested(args.pool, tmp, fmt=args.format, strict=False)
        records = [{"id": r["id"], "messages": r["messages"]} for r in iter_ingested_records(tmp)]
    if not records:
        print(json.dumps({"error": "no valid records in the pool"}), file=sys.stderr)
        return 2
    chosen = _sample_records(records, args.n, args.seed)
    result = probe(model, encoder, build_probe_set(chosen, seed=args.seed), batch_size=args.batch_size)
    result.update(model_dir=str(args.model_dir), seed=args.seed)
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


__all__ = ["probe_main"]
