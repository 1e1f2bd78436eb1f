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

import numpy as np
import pyarrow as pa

logger = logging.getLogger(__name__)

# Above this share of a dataset's rows truncated, the stage warns (a few over-long outliers do not).
WARN_SHARE = 0.05
KEEP_SHARE = 0.9  # the warning names the max_length that keeps this share of the dataset's rows whole
TRUNCATION_COLUMNS = ("dataset", "truncated", "full_tokens")


def truncation_summary(
    stage: str, tables: Sequence[pa.Table], max_length: int, *, effect: str
) -> dict[str, Any]:
    """``{"max_length", "datasets": {name: {"rows", "truncated", "share", "keep_length"}}, "warnings"}`` of
    tables with :data:`TRUNCATION_COLUMNS` (a stage's shards or blocks; none = no datasets); logs each
    warning. ``keep_length``: the ``max_length`` that would keep :data:`KEEP_SHARE` of the dataset's rows
    whole. ``effect``: what a truncated row means for this stage (e.g. "their scores describe a prefix")."""
    datasets: dict[str, dict[str, Any]] = {}
    if tables:
        flags = pa.concat_tables([t.select(list(TRUNCATION_COLUMNS)) for t in tables])
        names = flags.column("dataset").to_numpy(zero_copy_only=False)
        cut = flags.column("truncated").to_numpy(zero_copy_only=False)
        full = flags.column("full_tokens").to_numpy()
        for name in sorted(set(names.tolist())):
            rows = names == name
            n, k = int(rows.sum()), int(cut[rows].sum())
            keep = int(np.ceil(np.quantile(full[rows], KEEP_SHARE, method="higher")))
            datasets[name] = {"rows": n, "truncated": k, "share": round(k / n, 4), "keep_length": keep}
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
        f"{stage}: {c['share']:.1%} of {name} rows ({c['truncated']}/{c['rows']}) truncated at {max_length} "
        f"tokens; {effect} (max_length={c['keep_length']} keeps {KEEP_SHARE:.0%} of them whole)"
        for name, c in datasets.items()
        if c["rows"] and c["truncated"] / c["rows"] > WARN_SHARE
    ]
    for line in lines:
        logger.warning(line)
    return lines


__all__ = ["KEEP_SHARE", "TRUNCATION_COLUMNS", "WARN_SHARE", "truncation_summary", "truncation_warnings"]
