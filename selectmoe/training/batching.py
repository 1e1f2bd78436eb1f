"""Effective-batch arithmetic: global batch = micro batch x gradient-accumulation steps x world size.

The original picked "whichever of floor/ceil is closest" when the global batch did not divide evenly, so
the batch silently changed with the GPU count. Here it must divide exactly, or it is an error that says
which numbers would work.
"""

from __future__ import annotations


def grad_accum_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Gradient-accumulation steps so that ``micro_batch * steps * world_size == global_batch`` exactly.

    Raises ``ValueError`` naming the offending numbers (and valid micro-batch sizes) otherwise.
    """
    for name, value in (
        ("batch_size", global_batch),
        ("micro_batch_size", micro_batch),
        ("num_workers", world_size),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    per_step = micro_batch * world_size
    if global_batch % per_step:
        valid = [m for m in range(1, global_batch + 1) if global_batch % (m * world_size) == 0]
        hint = (
            f"micro_batch_size in {valid}"
            if valid
            else f"a batch_size that is a multiple of num_workers={world_size}"
        )
        raise ValueError(
            f"batch_size={global_batch} is not divisible by micro_batch_size={micro_batch} x "
            f"num_workers={world_size} = {per_step}; the global batch must be exact (use {hint})"
        )
    return global_batch // per_step


def steps_per_epoch(n_rows: int, global_batch: int, world_size: int) -> int:
    """Optimizer steps in one epoch over ``n_rows`` samples split equally across ``world_size`` workers.

    Each worker gets ``n_rows // world_size`` rows (Ray Data's equal split drops the remainder); the last
    partial global batch of an epoch is dropped so every step has exactly ``global_batch`` samples.
    """
    per_worker_batch = global_batch // world_size
    return (n_rows // world_size) // per_worker_batch
