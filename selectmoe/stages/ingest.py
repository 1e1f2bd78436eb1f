"""Stage ``ingest``: validate the pool once into Parquet shards + ``rejected.jsonl`` (:mod:`selectmoe.data.ingest`).

Every later stage reads the shards in its ``ingest_dir``; none of them ingests by itself.
"""

from __future__ import annotations

from selectmoe.config import DataConfig
from selectmoe.data.ingest import IngestResult, ingest_pool
from selectmoe.stages.contract import check_inputs


def run_ingest(cfg: DataConfig) -> IngestResult:
    check_inputs("ingest", cfg)
    return ingest_pool(cfg.pool, cfg.ingest_dir, fmt=cfg.format, strict=cfg.strict)


__all__ = ["IngestResult", "run_ingest"]
