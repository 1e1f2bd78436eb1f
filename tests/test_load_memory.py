"""Host memory of loading (issue 22, item 5): score and train load a ~115M-parameter Select-MoE straight in
bf16 and peak at its bf16 size + 10%; convert holds one fp32 copy (old main: convert 1.78x its fp32 size, and
the warmup ``model_fn`` could only load fp32). Each load runs alone in a fresh process
(``benchmarks/load_memory.py``), its anonymous memory sampled."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "load_memory.py"


def _bench():
    spec = importlib.util.spec_from_file_location("load_memory", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_loads_peak_at_one_copy_in_the_target_dtype(tmp_path):
    bench = _bench()
    rows = {r["kind"]: r for r in bench.run_all(tmp_path)}
    print(rows)
    assert set(rows) == {"convert", "score", "train"}
    for kind, row in rows.items():
        assert 100e6 < row["params"] < 130e6, kind
        assert row["ratio"] <= bench.BOUND, (kind, row)
    assert rows["score"]["model_mb"] < 0.51 * rows["convert"]["model_mb"]  # really loaded in bf16
