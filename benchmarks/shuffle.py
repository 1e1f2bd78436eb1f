"""Cost of the loop's global per-epoch shuffle: permutation + gathering each micro-batch by index from the
worker's Arrow table, against reading the same micro-batches in stored order (what a stream gives).

    python benchmarks/shuffle.py [--rows 100000] [--length 256] [--micro-batch-size 4]

Prints, per size (the demo pool's 2,133 rows and ``--rows``): the table's memory, the permutation time,
the time to build every micro-batch of one epoch shuffled and in order, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def table_of(n: int, length: int, seed: int = 0):
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    lengths = rng.integers(length // 4, length + 1, size=n)
    flat = rng.integers(5, 32000, size=int(lengths.sum())).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    col = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
    return pa.table({"input_ids": col, "labels": col}).combine_chunks(), int(lengths.sum())


def epoch_cost(table, micro: int, *, shuffle: bool) -> tuple[float, float]:
    from selectmoe.training.loop import collate_rows, epoch_order

    t0 = time.perf_counter()
    order = epoch_order(table.num_rows, 42, 0, shuffle=shuffle)
    t_perm = time.perf_counter() - t0
    for i in range(0, table.num_rows - micro + 1, micro):
        collate_rows(table, order[i : i + micro], 0)
    return t_perm, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    args = p.parse_args(argv)
    out = []
    for n in (2133, args.rows):
        table, tokens = table_of(n, args.length)
        perm_s, shuffled_s = epoch_cost(table, args.micro_batch_size, shuffle=True)
        _, ordered_s = epoch_cost(table, args.micro_batch_size, shuffle=False)
        out.append(
            {
                "rows": n,
                "tokens": tokens,
                "table_mb": round(table.nbytes / 2**20, 1),
                "permutation_ms": round(perm_s * 1e3, 2),
                "epoch_batches_shuffled_s": round(shuffled_s, 3),
                "epoch_batches_in_order_s": round(ordered_s, 3),
                "shuffled_over_in_order": round(shuffled_s / ordered_s, 3),
                "us_per_row_shuffled": round(shuffled_s / n * 1e6, 1),
            }
        )
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
