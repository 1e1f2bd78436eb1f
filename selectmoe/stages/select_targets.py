"""The select stage's target examples, scored by the same model in the same way as the pool.

The pool's router data records how it was scored (``_manifest.json``: the score config and the model
fingerprint). The target examples (:func:`selectmoe.selection.targets.load_targets`) are written as a tiny
JSONL, ingested and scored by the score stage itself (:func:`selectmoe.stages.score.run_score` with the
pool's score config, one replica), so a target's routing/hidden features are the numbers the pool's rows
would get. The result lives in ``<router_dir>/_targets/<key>/``, keyed by the examples, the
pool's model fingerprint and the score stage's code version: reused by every selection over the same
router data until one of them changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from selectmoe.config import ScoreConfig
from selectmoe.manifest import read_manifest
from selectmoe.router_data import shard_paths
from selectmoe.selection.targets import TargetSet, load_targets

logger = logging.getLogger(__name__)
TARGETS_DIR = "_targets"  # under the router dir: the scored target examples, one dir per cache key


@dataclass
class TargetFeatures:
    """Target examples and their stored feature columns, in example order."""

    targets: TargetSet
    columns: dict[str, np.ndarray]  # "routing" [T, L*E], "hidden" [T, D] when the pool has it
    key: str
    cached: bool
    wall_s: float

    def summary(self) -> dict:
        counts = {
            t: int(np.sum(np.asarray(self.targets.task_of) == i)) for i, t in enumerate(self.targets.tasks)
        }
        return {"tasks": counts, "examples": len(self.targets), "key": self.key, "cached": self.cached,
                "wall_s": round(self.wall_s, 3)}  # fmt: skip


def pool_score_config(router_dir: str | Path) -> tuple[ScoreConfig, str]:
    """(the score config the pool was scored with, its model fingerprint), from the router data manifest."""
    manifest = read_manifest(router_dir) or {}
    cfg, fp = manifest.get("config"), (manifest.get("extra") or {}).get("model_fingerprint")
    if manifest.get("stage") != "score" or not isinstance(cfg, dict) or not fp:
        raise ValueError(
            f"select.target: {router_dir}/_manifest.json is not a score stage's manifest; target examples "
            "are scored the way the pool was, so the pool must come from the score stage"
        )
    known = {f.name for f in dataclasses.fields(ScoreConfig)}
    return ScoreConfig(**{k: v for k, v in cfg.items() if k in known}), str(fp)


def _read_scored(router: Path, n: int) -> dict[str, np.ndarray]:
    shards = shard_paths(router)
    table = pa.concat_tables([pq.read_table(p) for p in shards])
    order = np.argsort(np.asarray(table.column("id").to_pylist()))
    if table.num_rows != n:
        raise RuntimeError(f"{router}: {table.num_rows} scored target rows for {n} examples")
    out = {}
    for name in ("routing", "hidden"):
        if name in table.column_names:
            col = table.column(name).combine_chunks()
            out[name] = col.flatten().to_numpy(zero_copy_only=False).reshape(n, -1)[order].astype(np.float32)
    return out


def score_targets(specs: list[str], router_dir: str | Path) -> TargetFeatures:
    """Load ``specs`` and score them like the pool in ``router_dir`` (or reuse the cached scores)."""
    from selectmoe.code_version import code_version

    t0 = time.perf_counter()
    targets = load_targets(specs)
    score_cfg, model_fp = pool_score_config(router_dir)
    payload = [targets.fingerprint(), model_fp, code_version("selectmoe.stages.score")]
    key = hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]
    work = Path(router_dir) / TARGETS_DIR / key
    router = work / "router"
    cached = bool((read_manifest(router) or {}).get("complete"))
    if not cached:
        from selectmoe.data.ingest import ingest_pool
        from selectmoe.stages.score import run_score

        work.mkdir(parents=True, exist_ok=True)
        src = work / "targets.jsonl"
        src.write_text(
            "".join(
                json.dumps({"dataset": r["dataset"], "id": f"t{i:07d}", "messages": r["messages"]}) + "\n"
                for i, r in enumerate(targets.records)
            ),
            encoding="utf-8",
        )
        ingested = ingest_pool([str(src)], work / "ingest")
        if ingested.n_valid != len(targets):
            raise ValueError(
                f"select.target: {ingested.n_rejected} target example(s) rejected by ingest "
                f"(see {work / 'ingest' / 'rejected.jsonl'})"
            )
        run_score(
            dataclasses.replace(
                score_cfg, ingest_dir=str(work / "ingest"), output_dir=str(router), num_replicas=1
            )
        )
    columns = _read_scored(router, len(targets))
    wall = time.perf_counter() - t0
    logger.info(
        "select: %d target examples %s in %.1fs", len(targets), "cached" if cached else "scored", wall
    )
    return TargetFeatures(targets=targets, columns=columns, key=key, cached=cached, wall_s=wall)


@dataclass
class TargetSimilarity:
    """Per pool row, its best cosine similarity to each target task (``similarity [N, tasks]``), and each
    task's neighbourhood threshold (:func:`~selectmoe.selection.targeted.neighbourhood_thresholds`)."""

    features: str
    target: TargetFeatures
    similarity: np.ndarray
    thresholds: np.ndarray
    similarity_s: float

    def summary(self, picks: dict[str, np.ndarray]) -> dict:
        """For selection.json: the targets, the cost, and each arm's mean best similarity per task."""
        tasks = self.target.targets.tasks
        return {
            **self.target.summary(),
            "features": self.features,
            "similarity_s": round(self.similarity_s, 3),
            "neighbourhood": {
                task: {"threshold": float(thr) if np.isfinite(thr) else None, "pool_rows": int(count)}
                for task, thr, count in zip(
                    tasks,
                    self.thresholds,
                    (np.isfinite(self.similarity) & (self.similarity >= self.thresholds)).sum(axis=0),
                    strict=True,
                )
            },
            "mean_similarity": {
                "pool": dict(zip(tasks, np.round(self.similarity.mean(axis=0), 6).tolist())),
                **{
                    name: dict(zip(tasks, np.round(self.similarity[idx].mean(axis=0), 6).tolist()))
                    for name, idx in picks.items()
                    if len(idx)
                },
            },
        }


def target_similarity(cfg, shards: list[Path], columns: list[str], widths: dict[str, int], n: int):
    """Score ``cfg.target`` like the pool, then each pool row's best similarity per task over the feature
    ``columns`` (select's resolved ``select.features``), streamed over the router-data ``shards``
    (:func:`selectmoe.selection.similarity.pool_similarity`)."""
    from selectmoe.selection.similarity import pool_similarity, unit_rows
    from selectmoe.selection.targeted import neighbourhood_thresholds

    target = score_targets(list(cfg.target), cfg.router_dir)
    missing = [c for c in columns if c not in target.columns]
    if missing:
        raise ValueError(f"select.target: the scored target examples have no {missing} column")
    X = np.concatenate([target.columns[c] for c in columns], axis=1)
    rows = unit_rows(X, [widths[c] for c in columns])
    t0 = time.perf_counter()
    tasks = target.targets.tasks
    sim = pool_similarity(shards, columns, widths, rows, target.targets.task_of, len(tasks))
    if len(sim) != n:
        raise RuntimeError(f"{len(sim)} similarity rows for {n} pool rows")
    thresholds = neighbourhood_thresholds(rows, target.targets.task_of, len(tasks))
    return TargetSimilarity("+".join(columns), target, sim, thresholds, time.perf_counter() - t0)
