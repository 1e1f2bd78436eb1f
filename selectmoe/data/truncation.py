"""Truncation is never silent: per-dataset counts of rows cut at ``max_length`` and one warning per
dataset whose truncated share is large (its scores / training signal describe a prefix only).

The encoder keeps the first ``max_length`` tokens and flags the row ``truncated``
(:mod:`selectmoe.data.encoding`); the warmup and score stages count those flags per dataset with
:func:`truncation_summary`, log :func:`truncation_warnings`, and record both in their manifest
(``extra.truncation``), from where the run report shows the warnings above everything else.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

logger = logging.getLogger(__name__)

# Above this share of a dataset's rows truncated, the stage warns (a few over-long outliers do not).
WARN_SHARE = 0.05


def truncation_summary(
    stage: str, tables: Sequence[pa.Table], max_length: int, *, effect: str
) -> dict[str, Any]:
    """``{"max_length", "datasets": {name: {"rows", "truncated", "share"}}, "warnings": [...]}`` of tables
    with ``dataset`` and ``truncated`` columns (a stage's shards or blocks; none = no datasets); logs each
    warning. ``effect``: what a truncated row means for this stage (e.g. "their scores describe a prefix")."""
    grouped = {"dataset": [], "truncated_count": [], "truncated_sum": []}
    if tables:
        flags = pa.concat_tables([t.select(["dataset", "truncated"]) for t in tables])
        grouped = (
            flags.group_by("dataset").aggregate([("truncated", "count"), ("truncated", "sum")]).to_pydict()
        )
    datasets = {}
    for name, rows, cut in zip(
        grouped["dataset"],
        grouped["truncated_count"],
        grouped["truncated_sum"],
        strict=True,
    ):
        datasets[name] = {"rows": int(rows), "truncated": int(cut or 0), "share": round((cut or 0) / rows, 4)}
    datasets = dict(sorted(datasets.items()))
    return {
        "max_length": int(max_length),
        "datasets": datasets,
        "warnings": truncation_warnings(stage, datasets, max_length, effect=effect),
    }


def truncation_warnings(
    stage: str, datasets: dict[str, dict[str, Any]], max_length: int, *, effect: str
) -> list[str]:
    """One line per dataset whose truncated share exceeds :data:`WARN_SHARE`, each also logged."""
    lines = [
        f"{stage}: {c['share']:.1%} of {name} rows ({c['truncated']}/{c['rows']}) truncated at {max_length} tokens; {effect}"
        for name, c in datasets.items()
        if c["rows"] and c["truncated"] / c["rows"] > WARN_SHARE
    ]
    for line in lines:
        logger.warning(line)
    return lines


__all__ = ["WARN_SHARE", "truncation_summary", "truncation_warnings"]
