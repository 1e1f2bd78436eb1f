"""Import layering, read from the source (AST): no module imports one above it."""

from __future__ import annotations

import ast
from pathlib import Path

import selectmoe

ROOT = Path(selectmoe.__file__).parent
TOP = {"selectmoe.probe", "selectmoe.report", "selectmoe.pipeline", "selectmoe.cli"}
LIBRARY = ("data", "model", "training", "selection", "cluster", "scoring")
# The report stage's thin wrapper is the one stage module that calls a module above the stages.
ALLOWED = {("selectmoe.stages.report", "selectmoe.report")}


def _imports(path: Path) -> set[str]:
    """Every ``selectmoe`` module a file imports, at module level or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("selectmoe.")}


def _module(path: Path) -> str:
    return ".".join(("selectmoe", *path.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")


def _violations(package: str, forbidden) -> list[str]:
    out = []
    for path in sorted((ROOT / package).rglob("*.py")):
        name = _module(path)
        out += [
            f"{name} imports {m}" for m in sorted(_imports(path)) if forbidden(m) and not _allowed(name, m)
        ]
    return out


def _under(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _allowed(importer: str, module: str) -> bool:
    return any(importer == i and _under(module, {m}) for i, m in ALLOWED)


def test_stages_never_import_probe_report_pipeline_or_cli():
    assert _violations("stages", lambda m: _under(m, TOP)) == []


def test_library_layers_never_import_stages_or_the_top():
    for package in LIBRARY:
        assert _violations(package, lambda m: _under(m, {"selectmoe.stages", *TOP})) == [], package


def test_the_checker_sees_function_level_imports(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from selectmoe.probe import ProbeEval\n    import selectmoe.cli\n")
    assert _imports(path) == {"selectmoe.probe", "selectmoe.probe.ProbeEval", "selectmoe.cli"}
