"""Stage ``report``: one HTML/Markdown report of a run (:mod:`selectmoe.report`).

The one stage module that imports a module above the stages: it is the report's thin stage wrapper. It
reads whatever earlier stages wrote under the run and requires none of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from selectmoe.config import PipelineConfig


@dataclass
class ReportResult:
    paths: dict[str, str] = field(default_factory=dict)  # written files by kind
    sections: int = 0

    def summary(self) -> dict[str, Any]:
        return {**self.paths, "sections": self.sections}


def run_report(cfg: PipelineConfig) -> ReportResult:
    from selectmoe.report import build_run_report

    out = dict(build_run_report(cfg))
    sections = int(out.pop("sections", 0))
    return ReportResult(paths={k: str(v) for k, v in out.items()}, sections=sections)


__all__ = ["ReportResult", "run_report"]
