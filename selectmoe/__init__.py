"""selectmoe: Select-MoE data selection on Ray.

Importing the package imports nothing heavy (the CLI's ``--help`` must not wait for torch); submodules load
on first use, ``selectmoe.model`` (which registers ``select_moe`` with the transformers Auto classes) too.

Importing it pins torch's CPU kernels to one instruction set (``selectmoe.cpu_isa``): every entry point
imports the package before torch runs a kernel, so results do not depend on the CPU they ran on.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from selectmoe.cpu_isa import pin_cpu_isa

pin_cpu_isa()

__version__ = "0.1.0"


def __getattr__(name: str) -> ModuleType:
    """``selectmoe.model`` etc. without an explicit import of the submodule (PEP 562)."""
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
