"""Which torch CPU kernels move with the instruction set, and what pinning one level costs.

    python benchmarks/cpu_isa.py [--steps 8] [--threads 1]

One fresh process per setting (the variables are read when torch runs its first kernel): a seeded
tiny-OLMoE training run (the demo's base pre-training, batch 16) prints fingerprints of a bare matmul
(MKL sgemm), a softmax and a ``randn`` (ATen's vectorised kernels), the parameters after ``--steps`` AdamW
steps and the last loss, and the median thread CPU time of a step (CPU time, not wall: the figure holds on a
loaded box; 1 torch thread by default so no OpenMP spin-wait is counted). Settings: torch's own choice
(``SELECTMOE_CPU_ISA=native``), one knob at a time, the pinned level (``selectmoe.cpu_isa``: avx2) and the
baseline (ATen's scalar kernels + MKL's SSE2 branch). Figures: docs/benchmarks.md, "Same results on every
CPU".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys

SETTINGS: dict[str, dict[str, str]] = {
    "native (torch's choice)": {"SELECTMOE_CPU_ISA": "native"},
    "ATEN_CPU_CAPABILITY=avx2": {"SELECTMOE_CPU_ISA": "native", "ATEN_CPU_CAPABILITY": "avx2"},
    "ATEN_CPU_CAPABILITY=default": {"SELECTMOE_CPU_ISA": "native", "ATEN_CPU_CAPABILITY": "default"},
    "MKL_CBWR=AVX2": {"SELECTMOE_CPU_ISA": "native", "MKL_CBWR": "AVX2"},
    "MKL_CBWR=AVX512": {"SELECTMOE_CPU_ISA": "native", "MKL_CBWR": "AVX512"},
    "MKL_CBWR=COMPATIBLE": {"SELECTMOE_CPU_ISA": "native", "MKL_CBWR": "COMPATIBLE"},
    "ONEDNN_MAX_CPU_ISA=AVX2": {"SELECTMOE_CPU_ISA": "native", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "pinned (selectmoe.cpu_isa: avx2)": {},
    "baseline (default + COMPATIBLE)": {
        "SELECTMOE_CPU_ISA": "native",
        "ATEN_CPU_CAPABILITY": "default",
        "MKL_CBWR": "COMPATIBLE",
    },
}
KNOBS = ("SELECTMOE_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")


def _digest(arrays) -> str:
    h = hashlib.sha1()
    for a in arrays:
        h.update(a.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:8]


def child(steps: int, threads: int) -> dict:
    """The measurement, in this process (its environment already holds the setting)."""
    import random
    import tempfile
    import time
    from pathlib import Path

    import numpy as np
    import torch

    import selectmoe  # noqa: F401  (pins the level unless SELECTMOE_CPU_ISA=native)
    from selectmoe.data.demo_pool import build_demo_pool
    from selectmoe.data.encoding import ChatEncoder, EncodingSpec, pad_batch
    from selectmoe.demo import _read_records
    from selectmoe.model.tiny import build_tiny_olmoe, train_bpe_tokenizer

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    g = torch.Generator().manual_seed(0)
    a = torch.from_numpy(np.random.default_rng(0).standard_normal((64, 128), dtype=np.float32))  # same bits
    prints = {
        "matmul": _digest([a @ a.T]),
        "softmax": _digest([torch.softmax(a, -1)]),
        "randn": _digest([torch.randn(64, 128, generator=g)]),
    }
    with tempfile.TemporaryDirectory() as tmp:
        corpus = build_demo_pool(Path(tmp) / "c", n_clean=40, bad_fraction=0.0, seed=1, parquet_fraction=0)
        records = _read_records(corpus.paths)
    tok = train_bpe_tokenizer([m["content"] for r in records for m in r["messages"]], vocab_size=300)
    encoder = ChatEncoder(tok, EncodingSpec(max_length=256, label_mode="full_sequence"))
    encoded = [encoder.encode(r["messages"]) for r in records]
    model = build_tiny_olmoe(tok, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng, times = random.Random(0), []
    for _ in range(steps + 1):  # the first step warms the allocator and is not timed
        batch = pad_batch(rng.sample(encoded, 16), tok.pad_token_id)
        t0 = time.thread_time()
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.thread_time() - t0)
    times = sorted(times[1:])
    return {"level": torch.backends.cpu.get_cpu_capability(), **prints, "params": _digest(model.parameters()),
            "loss": repr(loss.item()), "ms_per_step": round(1000 * times[len(times) // 2], 1)}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.steps, args.threads)))
        return 0
    clean = {k: v for k, v in os.environ.items() if k not in KNOBS}
    rows = {}
    for name, env in SETTINGS.items():
        cmd = [sys.executable, __file__, "--child", f"--steps={args.steps}", f"--threads={args.threads}"]
        out = subprocess.run(cmd, env={**clean, **env}, capture_output=True, text=True, check=True)
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(name, rows[name], file=sys.stderr, flush=True)
    ref = rows["native (torch's choice)"]["ms_per_step"]
    print(
        "| setting | ATen level | matmul | softmax | randn | params after steps | last loss | ms/step | vs native |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['level']} | {r['matmul']} | {r['softmax']} | {r['randn']} | {r['params']} | "
              f"{r['loss']} | {r['ms_per_step']} | {r['ms_per_step'] / ref:.2f}x |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
