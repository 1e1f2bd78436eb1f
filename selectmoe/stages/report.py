"""Stage ``report``: one HTML/Markdown report of a run (:mod:`selectmoe.report`).

The one stage module that imports a module above the stages: it is the report's thin stage wrapper. It
reads whatever earlier stages wrote under the run and requires none of it.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selectmoe import storage
from selectmoe.config import PipelineConfig


@dataclass
class ReportResult:
    paths: dict[str, str] = field(default_factory=dict)  # written files by kind
    sections: int = 0

    def summary(self) -> dict[str, Any]:
        return {**self.paths, "sections": self.sections}


def run_report(cfg: PipelineConfig) -> ReportResult:
    """The report of the run in ``cfg.output_dir``; on shared storage (a URI), built from a local copy of
    the run's small files (models, checkpoints and adapters stay remote) and uploaded to ``report/``."""
    from selectmoe.report import build_run_report

    if not storage.is_uri(cfg.output_dir):
        out = dict(build_run_report(cfg))
    else:
        with tempfile.TemporaryDirectory(prefix="selectmoe-report-") as view:
            storage.download_dir(cfg.output_dir, view, skip=_NOT_REPORTED)
            out = dict(build_run_report(_rebased(cfg, cfg.output_dir, view)))
            storage.upload_dir(Path(view) / "report", storage.join(cfg.output_dir, "report"))
            out = {k: v.replace(view, cfg.output_dir) if isinstance(v, str) else v for k, v in out.items()}
    sections = int(out.pop("sections", 0))
    return ReportResult(paths={k: str(v) for k, v in out.items()}, sections=sections)


# What the report never reads: weights, checkpoints and tokenizers (by file name), and Ray Train results.
_NOT_REPORTED = ("ray_results/", ".safetensors", ".bin", "tokenizer.json", "/pool/", "/pretrain_corpus/")


def _rebased(node: Any, old: str, new: str) -> Any:
    """A copy of a config dataclass with every string under ``old`` moved under ``new``."""
    changes = {}
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            changes[f.name] = _rebased(value, old, new)
        elif isinstance(value, str) and (value == old or value.startswith(old.rstrip("/") + "/")):
            changes[f.name] = new + value[len(old.rstrip("/")) :]
    return dataclasses.replace(node, **changes)


__all__ = ["ReportResult", "run_report"]
