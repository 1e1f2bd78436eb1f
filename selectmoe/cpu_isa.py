"""The same float results on every x86 CPU: pin the instruction set of torch's CPU kernels.

Torch picks its CPU kernels by what the processor offers, and each choice rounds differently:

- ATen's vectorised kernels (softmax, exp/log, reductions, ``randn``, the optimiser's element-wise maths)
  are compiled per level and dispatched at run time (``ATEN_CPU_CAPABILITY``: default / avx2 / avx512);
- ``torch.matmul`` in fp32 is MKL's sgemm, whose code branch follows the CPU too (fixed by MKL's
  conditional numerical reproducibility, ``MKL_CBWR``);
- oneDNN (``ONEDNN_MAX_CPU_ISA``) serves convolutions and low-precision matmuls.

A seeded CPU training run is bit-reproducible on one machine and a different run on another (measured in
docs/benchmarks.md, "Same results on every CPU"): the warmup's probe, the scores and the selection moved with
the CPU. Pinning every knob to the AVX2 level gives the same bits on every x86-64 CPU with AVX2 (Intel since
2013, AMD since 2015; an AVX-512 box runs its AVX2 kernels) at a cost measured in the same section.

The variables are read when torch first runs a kernel (not at ``import torch``), and by every process:
:func:`pin_cpu_isa` runs first in each entry point (CLI, ``ray job`` entrypoints, tests/conftest.py), and
:data:`selectmoe.ray_utils.WORKER_ENV` carries the same values to every Ray worker. Imports stdlib only.

``SELECTMOE_CPU_ISA=native`` opts out (torch's own choice, fastest, results per CPU).
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

SWITCH = "SELECTMOE_CPU_ISA"
# level -> the variables that select it. avx2: the widest level every x86 CI runner and laptop of the
# last decade offers; MKL's AVX2 branch gives the same sgemm bits on Intel and AMD.
LEVELS: dict[str, dict[str, str]] = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "native": {},
}
DEFAULT_LEVEL = "avx2"


def cpu_isa_env(environ: os._Environ | dict | None = None) -> dict[str, str]:
    """The variables that pin the kernels to the level ``SELECTMOE_CPU_ISA`` names (default avx2)."""
    environ = os.environ if environ is None else environ
    level = environ.get(SWITCH, DEFAULT_LEVEL).strip().lower() or DEFAULT_LEVEL
    if level not in LEVELS:
        raise ValueError(f"{SWITCH}={level!r}: expected one of {', '.join(LEVELS)}")
    return {SWITCH: level, **LEVELS[level]}


def cpu_isa_level() -> str:
    """The level this process pins (``avx2`` | ``native``): part of every stage key and manifest, since a
    result made at one level is not the result another would make."""
    return cpu_isa_env()[SWITCH]


def pin_cpu_isa() -> dict[str, str]:
    """Set the pinning variables in this process (before its first torch kernel runs); returns them.

    They override values already in the environment (a machine-wide ``ATEN_CPU_CAPABILITY=avx512`` would
    otherwise make this process's results differ from everyone else's); ``SELECTMOE_CPU_ISA=native`` keeps
    them."""
    env = cpu_isa_env()
    for key, value in env.items():
        if os.environ.get(key, value) != value:
            logger.info("%s: %s=%s replaced by %s (set %s=native to keep it)", __name__, key,
                        os.environ[key], value, SWITCH)  # fmt: skip
        os.environ[key] = value
    return env
