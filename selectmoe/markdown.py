"""THE Markdown table writer (the run report, the evaluation comparison): one format everywhere."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def markdown_table(
    header: Sequence[str], rows: Sequence[Sequence[Any]], fmt: Callable[[Any], str] = str
) -> str:
    """``| a | b |`` lines with a ``|---|`` rule under the header; cells written by ``fmt``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


__all__ = ["markdown_table"]
