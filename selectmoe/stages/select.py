"""Stage 3 — select: cosine k-means over routing (or hidden-state) features, k sweep on Ray, per-cluster picking.

``run_select(cfg)`` never holds the pool's ``[N, F]`` feature matrix:

1. reads the small router-data columns (ids, datasets as dictionary codes, the scores) as Arrow/numpy;
2. fits the clustering (a fixed ``cfg.k``, or a Ray k sweep over every k in ``cfg.k_range`` with the k
   chosen by ``cfg.k_choice``) on a seeded sample of ``cfg.fit_sample_rows`` rows of the ``cfg.features``
   columns (a pool that fits is fitted whole: the exact result), silhouette on at most
   ``cfg.silhouette_sample_rows`` of them with its standard error;
3. assigns every row to the chosen centroids in one streaming pass (a task per shard) and writes
   ``assignments.parquet`` (id, cluster, cosine);
4. ranks rows by ``cfg.score`` (one of :data:`selectmoe.selection.SCORERS`), applies ``cfg.policy`` at budget
   ``max(1, round(pct × N))`` plus every ``cfg.baselines`` policy at the same budget, joins the picked
   rows against the ingested pool shard by shard (memory O(selected)) and writes::

    selected_data.jsonl          {"dataset", "id", "scores", "cluster", "messages"} in selection order
    selected_<baseline>.jsonl    same format, same budget, cluster = the chosen labels
    assignments.parquet          id, cluster (int32), cosine to its centroid (float32), pool order
    selection.json               k curves (silhouette with its standard error), chosen k + reason, the fit
                                 (sample rows, exact or sampled, features, actors), cluster sizes/mean
                                 score, counts, inputs, diversity of every policy
    plots/*.png                  (cfg.plots) k sweep, cluster sizes, score histogram
    _manifest.json               write_manifest(stage="select")

Same inputs + seed ⇒ byte-identical jsonl / selection.json.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from selectmoe.cluster.features import resolve_features
from selectmoe.cluster.kselect import choose_k
from selectmoe.cluster.registry import get_clusterer
from selectmoe.cluster.stream import assign_pool, fit_sample_index, read_sample, shard_row_counts
from selectmoe.cluster.sweep import k_values, sweep_k
from selectmoe.config import SelectConfig
from selectmoe.manifest import fingerprint, read_manifest, write_manifest
from selectmoe.router_data import (
    NLL_COLUMNS,
    PROMPT_KEY,
    TEXT_COLUMNS,
    feature_widths,
    read_columns,
    router_shape,
    shard_paths,
)
from selectmoe.selection.policies import FLOOR_POLICIES, budget_for, cluster_mix, get_policy, id_ranks
from selectmoe.selection.prompts import one_answer_per_prompt
from selectmoe.selection.scorers import SCORERS, available_scorers, rank_groups, scorer_values
from selectmoe.selection.targeted import RDS, TARGET_POLICIES, TARGETED, nearest_round_robin, targeted_sample
from selectmoe.selection.writer import fetch_messages, write_selection_jsonl
from selectmoe.stages.contract import check_inputs
from selectmoe.stages.select_targets import TargetSimilarity, target_similarity

logger = logging.getLogger(__name__)

SELECTED_NAME = "selected_data.jsonl"
SELECTION_JSON = "selection.json"
ASSIGNMENTS = "assignments.parquet"
UNSCORED = ("random",)  # the reference of no selection at all: a sample of the whole pool, whatever the rules


@dataclass
class SelectResult:
    output_dir: str
    n_pool: int
    n_selected: int
    budget: int
    chosen_k: int
    k_choice: str
    reason: str
    policy: str
    silhouette: float | None
    inertia: float
    wall_s: float
    selected_path: str
    baselines: dict[str, str] = field(default_factory=dict)
    curves: dict[str, list] = field(default_factory=dict, repr=False)
    timings: dict[str, float] = field(default_factory=dict, repr=False)

    def summary(self) -> dict[str, Any]:
        return {
            "n_pool": self.n_pool,
            "n_selected": self.n_selected,
            "budget": self.budget,
            "chosen_k": self.chosen_k,
            "k_choice": self.k_choice,
            "policy": self.policy,
            "silhouette": self.silhouette,
            "inertia": round(self.inertia, 6),
            "wall_s": round(self.wall_s, 3),
            "output_dir": self.output_dir,
        }


def _nan_none(v: float) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)


@dataclass
class PoolColumns:
    """The small columns select needs, as Arrow/numpy (no Python object per row)."""

    ids: pa.Array
    dataset_codes: np.ndarray  # int32 [N], codes into dataset_names
    dataset_names: list[str]
    scores: dict[str, np.ndarray]  # quality + NLL columns, float32
    shard_of: np.ndarray  # int32 [N], index into shards
    rows_per_shard: np.ndarray
    prompt_keys: pa.Array | None = None  # int64 [N], null = no question (read_pool(prompt_keys=True))

    def __len__(self) -> int:
        return len(self.ids)


def read_pool(shards: list[Path], *, prompt_keys: bool = False) -> PoolColumns:
    """Every router-data row's id, dataset and score columns in one Arrow read: what ranking needs; with
    ``prompt_keys``, the :data:`PROMPT_KEY` column too (8 bytes a row)."""
    present = set(pq.read_schema(shards[0]).names)  # the gate and text signals are optional columns
    score_columns = [c for c in ("quality", *NLL_COLUMNS, *TEXT_COLUMNS) if c in present]
    if prompt_keys:
        for shard in shards:
            if PROMPT_KEY not in pq.read_schema(shard).names:
                raise ValueError(
                    f"select.one_answer_per_prompt: {shard} has no {PROMPT_KEY} column (router data scored "
                    "before the score stage wrote it: rescore it, or set select.one_answer_per_prompt=false)"
                )
    table = read_columns(shards, ["id", "dataset", *score_columns, *([PROMPT_KEY] if prompt_keys else [])])
    ds = pc.dictionary_encode(table.column("dataset")).combine_chunks()
    rows = shard_row_counts(shards)
    keys = table.column(PROMPT_KEY).combine_chunks() if prompt_keys else None
    if keys is not None and len(keys) and keys.null_count == len(keys):
        raise ValueError(
            f"select.one_answer_per_prompt: {PROMPT_KEY} is null on every row of {shards[0].parent} (router "
            "data written without the keys: rescore it with the score stage)"
        )
    return PoolColumns(
        ids=table.column("id").combine_chunks(),
        dataset_codes=ds.indices.to_numpy().astype(np.int32),
        dataset_names=ds.dictionary.to_pylist(),
        scores={c: table.column(c).to_numpy().astype(np.float32) for c in score_columns},
        shard_of=np.repeat(np.arange(len(shards), dtype=np.int32), rows),
        rows_per_shard=rows,
        prompt_keys=keys,
    )


def ranking_score(pool: PoolColumns, cfg: SelectConfig) -> np.ndarray:
    """Every row's ranking score, higher = better: ``select.score``, ranked within ``select.rank_within``."""
    groups = rank_groups({"dataset": pool.dataset_codes}, cfg.rank_within)
    return scorer_values(pool.scores, cfg.score, groups=groups)


def apply_policy(
    policy: str,
    quality: np.ndarray,
    labels: np.ndarray,
    budget: int,
    *,
    ranks: np.ndarray,
    seed: int,
    quality_floor: float,
    target: TargetSimilarity | None = None,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """``policy``'s picks at ``budget``: pool indices in selection order. ``ranks``: the ids' ranks
    (:func:`id_ranks`); ``target``: the pool's similarity to the target examples (``targeted``, ``rds``);
    ``rows``: sorted candidate rows (``select.one_answer_per_prompt``), the only rows every policy but
    :data:`UNSCORED` may take; None: all. The floor policies keep the pool's floor and seeded keys
    (:func:`floor_rows`), so the candidates only take rows out of what they would select (as a set: the
    round-robin order may change); the score-only policies rank the candidates as if they were the pool."""
    if policy in TARGET_POLICIES and target is None:
        raise ValueError(f"select.policy {policy!r} needs the target similarity (select.target)")
    candidates = None if policy in UNSCORED else rows
    floor = dict(ids=ranks, quality_floor=quality_floor, candidates=candidates)
    if policy == TARGETED:
        return targeted_sample(
            quality, labels, target.similarity, target.thresholds, budget, seed=seed, **floor
        )
    if policy == RDS:
        return nearest_round_robin(quality, target.similarity, budget, **floor)
    if policy in FLOOR_POLICIES:
        return get_policy(policy)(quality, labels, budget, seed=seed, **floor)
    if candidates is None:
        return get_policy(policy)(quality, labels, budget, ids=ranks, seed=seed)
    picked = get_policy(policy)(quality[rows], labels[rows], budget, ids=ranks[rows], seed=seed)
    return rows[picked]


def run_select(cfg: SelectConfig) -> SelectResult:
    check_inputs("select", cfg)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    seed = cfg.seed
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = shard_paths(cfg.router_dir)
    if not shards:
        raise FileNotFoundError(f"no router-data shards under {Path(cfg.router_dir) / 'shards'}")
    router_shape(shards)
    widths = feature_widths(shards)
    columns = resolve_features(cfg.features, widths)
    pool = read_pool(shards, prompt_keys=cfg.one_answer_per_prompt)
    n = len(pool)
    if n < 2:
        raise ValueError(f"selection needs at least 2 pool rows, router data has {n}")
    targeted = sorted(set(TARGET_POLICIES) & {cfg.policy, *cfg.baselines})
    if targeted and not cfg.target:
        raise ValueError(
            f"select.policy/baselines {targeted} need select.target (target examples: a JSONL or an eval task)"
        )
    if cfg.score not in available_scorers(pool.scores):
        raise ValueError(
            f"select.score={cfg.score!r}: not one of the scorers {cfg.router_dir} has values for "
            f"({available_scorers(pool.scores)}; all: {list(SCORERS)}; ifd needs score.ifd=true)"
        )
    sample_index = fit_sample_index(n, cfg.fit_sample_rows, seed)
    sample = read_sample(shards, pool.rows_per_shard, sample_index, columns, widths)
    timings["read"] = time.perf_counter() - t0
    clusterer = get_clusterer(cfg.method)
    common = dict(
        widths=[widths[c] for c in columns],
        n_init=cfg.n_init,
        max_iter=cfg.max_iter,
        tol=cfg.tol,
        seed=seed,
        silhouette_rows=cfg.silhouette_sample_rows,
        n_pool=n,
    )
    m = sample.shape[0]
    if cfg.k:
        k = cfg.k
        if not 1 <= k <= m:
            raise ValueError(f"k={k} outside [1, {m}]")
        sweep = sweep_k(sample, [k], clusterer, use_ray=False, **common)
        k_choice, reason = "fixed", f"fixed k={k} from config"
    else:
        ks = [k for k in k_values(cfg.k_range) if k <= m - 1] or [1]
        sweep = sweep_k(
            sample,
            ks,
            clusterer,
            num_actors=cfg.num_replicas,
            num_gpus_per_actor=cfg.num_gpus_per_replica,
            **common,
        )
        k, reason = choose_k(sweep.ks, sweep.inertia, sweep.silhouette, cfg.k_choice)
        k_choice = cfg.k_choice
    del sample
    timings["sweep"] = time.perf_counter() - t0 - timings["read"]
    curves = sweep.curves()
    i = sweep.ks.index(k)
    sil, sil_se = sweep.silhouette[i], sweep.silhouette_se[i]

    t1 = time.perf_counter()
    labels, cosine = assign_pool(shards, columns, widths, sweep.centroids[k])
    if sample_index is None:
        # the exact path: the sweep's own labels (identical to a nearest-centroid pass up to float ties)
        labels = sweep.labels[k]
        inertia = sweep.inertia[i]
    else:
        inertia = float((1.0 - cosine.astype(np.float64)).clip(min=0).sum())
    labels = np.asarray(labels, dtype=np.int64)
    pq.write_table(
        pa.table({"id": pool.ids, "cluster": labels.astype(np.int32), "cosine": cosine}),
        out / ASSIGNMENTS,
    )
    timings["assign"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    # the ranking score, higher = better (see selection/scorers.py)
    quality = ranking_score(pool, cfg)
    rank = id_ranks(pool.ids)
    budget = budget_for(n, cfg.selection_percentage)
    arms = [("selected", cfg.policy), *((b, b) for b in cfg.baselines)]
    target = target_similarity(cfg, shards, columns, widths, n) if cfg.target else None

    answers = None
    if cfg.one_answer_per_prompt:
        answers = one_answer_per_prompt(pool.prompt_keys, quality, rank)
        if len(answers.kept) < budget:
            logger.warning(
                "select.one_answer_per_prompt: %d rows answer distinct questions, fewer than the budget %d: "
                "every policy but random selects all of them",
                len(answers.kept),
                budget,
            )

    def pick(policy: str) -> np.ndarray:
        return apply_policy(
            policy, quality, labels, budget, ranks=rank, seed=seed, quality_floor=cfg.quality_floor,
            target=target, rows=None if answers is None else answers.kept,
        )  # fmt: skip

    picks = {name: pick(policy) for name, policy in arms}
    wanted = np.unique(np.concatenate([idx for idx in picks.values()])) if picks else np.zeros(0, np.int64)
    ids = dict(zip(wanted.tolist(), pool.ids.take(pa.array(wanted)).to_pylist()))
    datasets = {int(r): pool.dataset_names[c] for r, c in zip(wanted, pool.dataset_codes[wanted])}
    by_shard: dict[str, list[str]] = {}
    for r in wanted.tolist():
        by_shard.setdefault(shards[pool.shard_of[r]].stem, []).append(ids[r])
    messages = fetch_messages(cfg.pool_dir, by_shard)
    paths: dict[str, str] = {}
    for name, idx in picks.items():
        path = out / (SELECTED_NAME if name == "selected" else f"selected_{name}.jsonl")
        write_selection_jsonl(
            path, idx, ids=ids, datasets=datasets, scores=quality, labels=labels, messages=messages
        )
        paths[name] = str(path)
    del messages
    timings["rank_join_write"] = time.perf_counter() - t1

    sizes = np.bincount(labels, minlength=k)
    sums = np.bincount(labels, weights=quality, minlength=k)
    mean_quality = [float(s / c) if c else None for s, c in zip(sums, sizes)]
    sel_idx = picks["selected"]
    sel_per_cluster = np.bincount(labels[sel_idx], minlength=k)
    inputs = {
        "router_data": fingerprint(Path(cfg.router_dir) / "shards"),
        "pool": fingerprint(Path(cfg.pool_dir) / "shards"),
        **({"target": {"sha256": target.target.targets.fingerprint()}} if target else {}),
    }
    counts = {"pool": n, "selected": len(sel_idx), "budget": budget}
    if answers is not None:
        counts.update(answers.counts())
    selection = {
        "k_curves": curves,
        "chosen_k": int(k),
        "k_choice": k_choice,
        "reason": reason,
        "method": cfg.method,
        "fit": {
            "features": columns,
            "sample_rows": int(m),
            "exact": sample_index is None,
            "silhouette_rows": int(min(m, cfg.silhouette_sample_rows or m)),
            "actors": sweep.n_actors,
            "notices": sweep.notices,
        },
        "clusters": {
            "sizes": sizes.tolist(),
            "mean_quality": mean_quality,
            "selected": sel_per_cluster.tolist(),
            "mean_cosine": float(cosine.mean()),
        },
        "counts": counts,
        "baselines": {name: len(idx) for name, idx in picks.items() if name != "selected"},
        "score": cfg.score,
        "quality_floor": cfg.quality_floor,
        "rank_within": cfg.rank_within,
        "diversity": {name: cluster_mix(labels, idx, k) for name, idx in picks.items()},
        "mean_quality": {
            "pool": float(quality.mean()),
            **{name: float(quality[idx].mean()) if len(idx) else None for name, idx in picks.items()},
        },
        "chosen": {
            "inertia": float(inertia),
            "silhouette": _nan_none(sil),
            "silhouette_se": _nan_none(sil_se),
        },
        **({"target": target.summary(picks)} if target else {}),
        "seed": seed,
        "policy": cfg.policy,
        "selection_percentage": cfg.selection_percentage,
        "inputs": inputs,
    }
    tmp = out / f".{SELECTION_JSON}.tmp"
    tmp.write_text(json.dumps(selection, indent=2, sort_keys=True) + "\n")
    tmp.replace(out / SELECTION_JSON)
    if cfg.plots:
        from selectmoe.selection.plots import write_plots

        write_plots(
            out / "plots",
            curves=curves,
            chosen_k=int(k),
            rule=k_choice,
            sizes=sizes.tolist(),
            mean_quality=[m_ if m_ is not None else np.nan for m_ in mean_quality],
            pool_scores=quality,
            selected_scores=quality[sel_idx],
        )
    wall = time.perf_counter() - t0
    write_manifest(
        out,
        stage="select",
        config=cfg,
        inputs=inputs,
        counts={**counts, "chosen_k": int(k)},
        seed=seed,
        wall_s=wall,
        extra={
            "k_choice": k_choice,
            "reason": reason,
            "outputs": sorted([*(Path(p).name for p in paths.values()), ASSIGNMENTS]),
            "timings_s": {k_: round(v, 3) for k_, v in timings.items()},
        },
    )
    logger.info("select: %d/%d rows, k=%d (%s), %.1fs", len(sel_idx), n, k, reason, wall)
    return SelectResult(
        output_dir=str(out),
        n_pool=n,
        n_selected=len(sel_idx),
        budget=budget,
        chosen_k=int(k),
        k_choice=k_choice,
        reason=reason,
        policy=cfg.policy,
        silhouette=_nan_none(sil),
        inertia=float(inertia),
        wall_s=wall,
        selected_path=paths["selected"],
        baselines={k_: v for k_, v in paths.items() if k_ != "selected"},
        curves=curves,
        timings=timings,
    )


# --------------------------------------------------------------------------- CLI
def pool_dir_from_manifest(router_dir: str | Path) -> str | None:
    """The ingest dir a score stage recorded (config.ingest_dir or the ``ingest`` input), if it exists."""
    from selectmoe.data.ingest import list_shards

    manifest = read_manifest(router_dir) or {}
    candidates = []
    ingest = (manifest.get("config") or {}).get("ingest_dir")
    if isinstance(ingest, str):
        candidates.append(Path(ingest))
    for key, fp in (manifest.get("inputs") or {}).items():
        if "ingest" in key and isinstance(fp, dict) and isinstance(fp.get("path"), str):
            p = Path(fp["path"])
            candidates.append(p.parent if p.name == "_manifest.json" or p.is_file() else p)
    for c in candidates:
        if list_shards(c):
            return str(c)
    return None


def build_config(
    router_dir: str, *, pool_dir: str | None, out: str | None, overrides: Sequence[str]
) -> SelectConfig:
    from omegaconf import OmegaConf

    dotlist = OmegaConf.from_dotlist(list(overrides))
    given_pool = pool_dir or dotlist.get("pool_dir") or pool_dir_from_manifest(router_dir)
    if not given_pool:
        raise ValueError(
            f"no pool dir: {router_dir}/_manifest.json names no ingest dir with shards; pass --pool-dir DIR"
        )
    base = SelectConfig(
        router_dir=str(router_dir),
        pool_dir=str(given_pool),
        output_dir=str(out or Path(router_dir) / "selection"),
    )
    merged = OmegaConf.merge(OmegaConf.structured(base), dotlist)
    if pool_dir:
        merged.pool_dir = str(pool_dir)
    return OmegaConf.to_object(merged)


def _batch_dirs(root: Path) -> list[Path]:
    found = []
    for m in sorted(root.rglob("_manifest.json")):
        d = m.parent
        if (d / "shards").is_dir() and (read_manifest(d) or {}).get("stage") == "score":
            found.append(d)
    return found


def select_main(
    router_dir: str | None = None,
    *,
    batch: str | None = None,
    pool_dir: str | None = None,
    out: str | None = None,
    overrides: Sequence[str] = (),
) -> int:
    """``selectmoe select ROUTER_DIR [--pool-dir DIR] [--out DIR] [key=value ...]`` or
    ``selectmoe select --batch ROOT [key=value ...]`` (every score output under ROOT -> ``<dir>/selection``,
    skipping complete ones). ``overrides`` are SelectConfig keys (``k=3``)."""
    if (router_dir is None) == (batch is None):
        raise ValueError("give exactly one of router_dir or batch")
    if router_dir is not None:
        cfg = build_config(router_dir, pool_dir=pool_dir, out=out, overrides=overrides)
        print(json.dumps(run_select(cfg).summary(), indent=2))
        return 0
    rows, failed = [], 0
    dirs = _batch_dirs(Path(batch))
    if not dirs:
        print(
            f"selectmoe select: no score outputs (shards/ + _manifest.json) under {batch}",
            file=sys.stderr,
        )
        return 1
    for d in dirs:
        dest = d / "selection"
        done = read_manifest(dest)
        if done and done.get("complete"):
            c = done.get("counts") or {}
            rows.append([str(d), "skipped (complete)", c.get("pool"), c.get("selected"), c.get("chosen_k")])
            continue
        try:
            cfg = build_config(str(d), pool_dir=pool_dir, out=str(dest), overrides=overrides)
            s = run_select(cfg).summary()
            rows.append([str(d), "done", s["n_pool"], s["n_selected"], s["chosen_k"]])
        except Exception as exc:  # keep going: one bad dir must not stop the batch
            failed += 1
            rows.append([str(d), f"FAILED: {exc}"[:80], None, None, None])
    header = ["router_dir", "status", "pool", "selected", "k"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))
    return 1 if failed else 0
