"""Cost of ``score.hidden=true`` (pooled last-layer hidden state, JL-projected to 512 fp16) in time and disk.

    python benchmarks/hidden_cost.py [--layers 2] [--batch 8] [--tokens 256] [--reps 5] [--threads 2]

Time: THE scoring function (:func:`selectmoe.scoring.model.score_batch`) on a random-weight Select-MoE of
OLMoE-1B-7B's width (hidden 2,048, 64 experts, top-8, vocabulary 50,304) but only ``--layers`` layers, with
and without ``hidden``, interleaved, median of ``--reps``. Fewer layers make the pooling's share *larger*
than on the 16-layer model (the pooling is a per-token weighted sum after the last layer), so the
measured overhead bounds OLMoE's from above. Disk: router-data shards (the real writer, zstd) of 4,000 rows
at OLMoE's shape (16 x 64 routing) with and without the 512-d ``hidden`` column; bytes per row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def time_forward(args) -> dict:
    import torch

    from selectmoe.model import SelectMoeConfig, SelectMoeForCausalLM
    from selectmoe.scoring.features import projection_matrix
    from selectmoe.scoring.model import score_batch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = SelectMoeConfig(
        hidden_size=2048, intermediate_size=1024, num_hidden_layers=args.layers, num_attention_heads=16,
        num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, vocab_size=50304,
        max_position_embeddings=4096,
    )  # fmt: skip
    model = SelectMoeForCausalLM(cfg).eval()
    ids = torch.randint(0, 50304, (args.batch, args.tokens))
    mask = torch.ones_like(ids)
    mask[: args.batch // 2, args.tokens // 2 :] = 0  # half the rows padded
    proj = projection_matrix(2048, 512)
    times = {"off": [], "on": []}
    for rep in range(args.reps + 1):
        for mode in ("off", "on") if rep % 2 else ("on", "off"):
            t = time.perf_counter()
            score_batch(model, ids, mask, ids, scope="all", hidden=mode == "on", hidden_projection=proj)
            if rep:  # the first round warms up
                times[mode].append(time.perf_counter() - t)
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    return {"off_s": off, "on_s": on, "overhead": on / off - 1.0, "layers": args.layers, **time_pool(args)}


def time_pool(args) -> dict:
    """The added work alone (pooling + projection of one batch's last hidden states), median of 20: robust
    where a loaded machine makes the two forward timings noisy."""
    import torch

    from selectmoe.scoring.features import pooled_hidden, projection_matrix

    h = torch.randn(args.batch, args.tokens, 2048)
    mask = torch.ones(args.batch, args.tokens, dtype=torch.long)
    proj = projection_matrix(2048, 512)
    runs = []
    for _ in range(20):
        t = time.perf_counter()
        pooled_hidden(h, mask, proj)
        runs.append(time.perf_counter() - t)
    return {"pool_s": statistics.median(runs)}


def disk(rows: int = 4000) -> dict:
    from selectmoe.router_data import RouterDataWriter

    rng = np.random.default_rng(0)
    routing = rng.dirichlet(np.ones(64) * 0.3, size=(rows, 16)).reshape(rows, -1)
    hidden = rng.standard_normal((rows, 512)) / np.sqrt(512)
    cols = {
        "id": [f"row-{i:08d}" for i in range(rows)],
        "dataset": ["pool"] * rows,
        "n_tokens": rng.integers(50, 1000, rows),
        "truncated": np.zeros(rows, bool),
        "quality": rng.random(rows),
        "quality_layers": rng.random((rows, 16)),
        "routing": routing,
        "hidden": hidden,
    }
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, dim in (("without", 0), ("with", 512)):
            w = RouterDataWriter(Path(tmp) / name, "s", 16, 64, hidden_dim=dim)
            w.write_batch(cols)
            sizes[name] = w.close().stat().st_size / rows
    return {"bytes_per_row": sizes, "extra_bytes_per_row": sizes["with"] - sizes["without"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pool-only", action="store_true", help="time only the added pooling (no forward)")
    ap.add_argument("--json")
    args = ap.parse_args()
    out = {"time": time_forward(args) if not args.pool_only else time_pool(args), "disk": disk()}
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
