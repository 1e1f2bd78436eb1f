"""Torch's CPU kernels run at the pinned instruction-set level in every process, whatever the machine offers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# a matmul (MKL sgemm), a softmax and a randn (ATen's vectorised kernels): each rounds differently per level
PROBE = """
import hashlib, json, os
import selectmoe, torch
g = torch.Generator().manual_seed(0)
a, b = torch.randn(64, 128, generator=g), torch.randn(128, 96, generator=g)
h = lambda t: hashlib.sha1(t.numpy().tobytes()).hexdigest()[:12]
print(json.dumps({"level": torch.backends.cpu.get_cpu_capability(), "matmul": h(a @ b),
                  "softmax": h(torch.softmax(a, -1)), "randn": h(a)}))
"""
# a machine that offers only the baseline: ATen's scalar kernels, MKL's SSE2 branch
BASELINE_MACHINE = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41"}
KNOBS = ("SELECTMOE_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")


def _probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in KNOBS}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                         check=True, timeout=300)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kernels_are_pinned_to_avx2_whatever_the_machine_asks():
    """``import selectmoe`` before torch's first kernel pins the level: a process told to imitate a
    baseline-only CPU computes the same bits as one on this machine's own level; opting out
    (``SELECTMOE_CPU_ISA=native``) lets the imitation through, and every kernel above then rounds
    differently (what the pin removes)."""
    pinned = _probe()
    if pinned["level"] == "DEFAULT":
        pytest.skip("this CPU has no AVX2: the pinned level cannot run here")
    imitated = _probe(**BASELINE_MACHINE)
    assert pinned["level"] == imitated["level"] == "AVX2"
    assert pinned == imitated
    baseline = _probe(SELECTMOE_CPU_ISA="native", **BASELINE_MACHINE)
    assert baseline["level"] == "DEFAULT"
    assert all(baseline[k] != pinned[k] for k in ("matmul", "softmax", "randn")), (baseline, pinned)


def test_an_unknown_level_is_named():
    from selectmoe.cpu_isa import cpu_isa_env

    with pytest.raises(ValueError, match="SELECTMOE_CPU_ISA='avx9': expected one of avx2, native"):
        cpu_isa_env({"SELECTMOE_CPU_ISA": "avx9"})
    assert cpu_isa_env({}) == {"SELECTMOE_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2",
                               "ONEDNN_MAX_CPU_ISA": "AVX2"}  # fmt: skip


def test_ray_workers_get_the_pinned_level(ray_local):
    """Workers are started with the pin in their environment (``WORKER_ENV`` in the job's runtime env),
    so a worker that runs a kernel before it imports selectmoe runs it at the pinned level too."""

    @ray_local.remote
    def level() -> tuple[str, str | None]:
        import torch

        return torch.backends.cpu.get_cpu_capability(), os.environ.get("MKL_CBWR")

    assert ray_local.get(level.remote()) == ("AVX2", "AVX2")
