"""``benchmarks/gpu_check.py`` in its CPU mode (tiny shapes, the same code as on a GPU), so the prepared GPU
check never rots; on a GPU box, its precision section at the real OLMoE shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _run(tmp_path, *args: str) -> tuple[dict, str]:
    out = tmp_path / "gpu_check.json"
    res = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], capture_output=True, text=True,
                         check=False, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(out.read_text()), res.stdout


def test_gpu_check_cpu_mode_passes_every_check(tmp_path):
    report, stdout = _run(tmp_path, "--cpu")
    sections = report["sections"]
    assert list(sections) == ["env", "precision", "scoring", "training", "sweep"]  # pipeline: --pipeline only
    checks = {name: c for sec in sections.values() for name, c in sec.items() if not name.startswith("_")}
    assert all(c["pass"] for c in checks.values()), {k: c for k, c in checks.items() if not c["pass"]}
    lines = [x for x in stdout.splitlines() if x.startswith("CHECK ")]
    assert [x.split()[1] for x in lines] == list(checks)  # one printed line per check, in order
    # 2 layers at the tiny shape: gate weight + bias and router per layer, all fp32 and exact after the cast
    assert checks["cast_exact"]["fp32_tensors"] == 6 and checks["warmup_step"]["trainable"] == 6
    assert (
        checks["fsdp2_step_checkpoint"]["tensors"] == 6
        and checks["fsdp2_step_checkpoint"]["backend"] == "gloo"
    )
    assert checks["gates_fp32_under_autocast"]["dtypes"] == ["torch.float32"]
    assert checks["bf16_vs_fp32_rank"]["spearman"] >= 0.999
    assert checks["default_sweep_projection"]["k_range"] == [10, 100]


@pytest.mark.gpu
def test_gpu_check_precision_at_the_olmoe_shape(tmp_path):
    report, _ = _run(tmp_path, "--sections", "env,precision")
    checks = report["sections"]["precision"]
    assert all(c["pass"] for k, c in checks.items() if not k.startswith("_")), checks
