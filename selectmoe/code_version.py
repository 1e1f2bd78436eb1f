"""The code version of a stage: a sha256 over the source of every selectmoe module the stage can run.

A stage's result is reused only when nothing that made it changed, its code included. The modules a stage
runs are the transitive closure of its ``selectmoe`` imports, read from the source (AST, function-level
lazy imports included): a changed scorer reruns ``select``, a changed report template reruns ``report``
only. Package ``__init__`` files that load submodules lazily by name (``_LAZY = {"x": "selectmoe.a.b"}``)
count those names as imports. Data files a module reads at run time are listed in :data:`DATA_FILES`.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

import selectmoe

PACKAGE = "selectmoe"
# module -> package-relative directories of data files it reads (lm-eval task YAMLs and their helpers)
DATA_FILES = {"selectmoe.eval_tasks": ("tasks",)}


def _module_file(module: str, root: Path) -> Path | None:
    if module == PACKAGE:
        return root / "__init__.py"
    rel = Path(*module.split(".")[1:])
    for path in (root / rel.with_suffix(".py"), root / rel / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(path: Path, module: str) -> set[str]:
    """Fully qualified ``selectmoe`` modules ``path`` may import (a name imported from a package may be a
    submodule: both are returned, the caller keeps those that exist)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    is_init = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif is_init and isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.add(node.value)  # a lazy map's target module
    # importing a.b.c runs the __init__ of a.b too
    parents = {".".join(m.split(".")[:i]) for m in found for i in range(1, m.count(".") + 1)}
    return {m for m in found | parents if m.split(".")[0] == PACKAGE and m != module}


def module_closure(module: str, root: Path | None = None) -> list[Path]:
    """Source files of ``module`` and of every ``selectmoe`` module it imports, transitively, sorted."""
    root = Path(root or Path(selectmoe.__file__).parent)
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name, root)
        if path is None:
            continue
        seen[name] = path
        todo.extend(_imports(path, name) - seen.keys())
    files = set(seen.values())
    for name in seen:
        for rel in DATA_FILES.get(name, ()):
            files.update(p for p in (root / rel).rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return sorted(files)


@cache
def code_version(module: str) -> str:
    """sha256 over the relative paths and bytes of :func:`module_closure` (cached per process)."""
    root = Path(selectmoe.__file__).parent
    digest = hashlib.sha256()
    for path in module_closure(module, root):
        digest.update(f"{path.relative_to(root)}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()
