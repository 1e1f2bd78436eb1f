"""A stage's code version: the import closure it hashes, and that a code change reruns exactly the stages
that can run that code (the pipeline's stage keys, computed in a fresh interpreter on a copied package)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import selectmoe
from selectmoe.code_version import module_closure

ROOT = Path(selectmoe.__file__).parent


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_closure_follows_lazy_and_function_level_imports(tmp_path):
    pkg = tmp_path / "selectmoe"
    _write(pkg / "__init__.py", "")
    _write(
        pkg / "a.py", "import selectmoe.pkg\n\ndef run():\n    from selectmoe.b import f\n    return f()\n"
    )
    _write(pkg / "b.py", "import os\n\ndef f():\n    return 1\n")
    _write(pkg / "c.py", "from selectmoe.a import run\n")  # imports a, but a does not import c
    _write(pkg / "pkg" / "__init__.py", '_LAZY = {"thing": "selectmoe.pkg.lazy"}\n')
    _write(pkg / "pkg" / "lazy.py", "")
    _write(pkg / "pkg" / "other.py", "")
    got = {p.relative_to(pkg).as_posix() for p in module_closure("selectmoe.a", pkg)}
    assert got == {"__init__.py", "a.py", "b.py", "pkg/__init__.py", "pkg/lazy.py"}


def test_real_stage_closures():
    def files(stage: str) -> set[str]:
        return {p.relative_to(ROOT).as_posix() for p in module_closure(f"selectmoe.stages.{stage}")}

    select, warmup, evaluate = files("select"), files("warmup"), files("evaluate")
    assert {
        "stages/select.py",
        "selection/scorers.py",
        "selection/policies.py",
        "cluster/kmeans.py",
    } <= select
    assert not {"stages/warmup.py", "training/loop.py", "report.py"} & select
    assert {
        "stages/warmup.py",
        "training/loop.py",
        "model/modeling_select_moe.py",
        "model/artifact.py",
    } <= warmup
    assert "tasks/mmlu_template.yaml" in evaluate  # lm-eval task files the evaluate stage reads


_KEYS = """
import json
from selectmoe.config import load_config
from selectmoe.pipeline import stage_key
from selectmoe.stages.contract import STAGE_TABLE
cfg = load_config("demo", ["output_dir=/tmp/code-version-keys"])
print(json.dumps({s.name: stage_key(cfg, s.name) for s in STAGE_TABLE}))
"""


def test_a_code_change_reruns_exactly_the_stages_that_run_it(tmp_path):
    copy = tmp_path / "selectmoe"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}

    def keys() -> dict[str, str]:
        out = subprocess.run(
            [sys.executable, "-c", _KEYS], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    before = keys()
    assert keys() == before  # same code: same keys (nothing reruns)
    edited = copy / "cluster" / "kmeans.py"
    edited.write_text(edited.read_text() + "\n# an edit\n")
    after = keys()
    changed = {s for s in before if before[s] != after[s]}
    runs_it = {s for s in before if edited in module_closure(f"selectmoe.stages.{s}", copy)}
    assert "select" in changed and "warmup" not in changed and "ingest" not in changed
    assert changed == runs_it
