"""Bit-reproducible CPU training.

Multi-threaded CPU backward passes of the tiny OLMoE differ in the last bits from run to run (measured: two
identical backward passes with 2 threads gave different gradients in every layer below the top MoE block;
with 1 thread, identical), and training amplifies those bits: the demo's pre-trained base came out different
on every build, and with it the warmup's probe AUC and the selection. Torch's deterministic algorithms remove
that on CPU at no measurable cost (367 vs 374 ms per tiny-model step). GPU runs are not covered: deterministic
CUDA kernels cost speed and need ``CUBLAS_WORKSPACE_CONFIG``, so a GPU warmup is reproducible only up to
kernel nondeterminism.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def deterministic_cpu(enabled: bool = True) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True)`` in the block (if ``enabled``), then the previous mode."""
    if not enabled:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=warn_only)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with exactly ``n`` torch CPU threads, then restore the previous count.

    CPU float results depend on the thread count (the reductions split differently), even with
    deterministic algorithms: a step that decides the selection must use the count its resources asked
    for, never an inherited ``OMP_NUM_THREADS`` (Ray sets it to 1 for a ``ray job submit`` driver)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
