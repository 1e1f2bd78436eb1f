"""Stage 3 — select: cosine k-means over routing features, k sweep on Ray, per-cluster picking.

``run_select(cfg)`` reads router data (``load_router_data``), L2-normalises the float32 routing
features, clusters them (a fixed ``cfg.k`` or a Ray k sweep over every k in ``cfg.k_range`` with the
k chosen by ``cfg.k_choice``), ranks rows by ``cfg.score`` (one of :data:`selectmoe.selection.SCORERS`),
applies ``cfg.policy`` at budget ``max(1, round(pct × N))`` plus every
``cfg.baselines`` policy at the same budget, joins the picked ids against the ingested pool shards by
streaming (memory O(selected)) and writes::

    selected_data.jsonl          {"dataset", "id", "scores", "cluster", "messages"} in selection order
    selected_<baseline>.jsonl    same format, same budget, cluster = the chosen labels
    selection.json               k curves, chosen k + reason, cluster sizes/mean score, counts, inputs,
                                 diversity (clusters covered, cluster-mix entropy) of every policy
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

from selectmoe.cluster.kselect import choose_k
from selectmoe.cluster.registry import get_clusterer
from selectmoe.cluster.sweep import fit_k, k_values, sweep_k
from selectmoe.config import SelectConfig
from selectmoe.manifest import fingerprint, read_manifest, write_manifest
from selectmoe.router_data import load_router_data
from selectmoe.selection.policies import budget_for, cluster_mix, get_policy
from selectmoe.selection.scorers import SCORERS, available_scorers, rank_groups, scorer_values
from selectmoe.selection.writer import fetch_messages, write_selection_jsonl
from selectmoe.stages.contract import check_inputs

logger = logging.getLogger(__name__)

SELECTED_NAME = "selected_data.jsonl"
SELECTION_JSON = "selection.json"


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


def _features(routing: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """float16 [N, F] (memmap) -> float32 L2-normalised rows, converted chunk by chunk."""
    n = routing.shape[0]
    out = np.empty(routing.shape, dtype=np.float32)
    for s in range(0, n, chunk):
        block = np.asarray(routing[s : s + chunk], dtype=np.float32)
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        out[s : s + chunk] = block / np.where(norms > 0, norms, 1.0)
    return out


def _nan_none(v: float) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)


def run_select(cfg: SelectConfig) -> SelectResult:
    check_inputs("select", cfg)
    t0 = time.perf_counter()
    seed = cfg.seed
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rd = load_router_data(cfg.router_dir)
    n = len(rd)
    if n < 2:
        raise ValueError(f"selection needs at least 2 pool rows, router data has {n}")
    if cfg.score not in available_scorers(rd):
        raise ValueError(
            f"select.score={cfg.score!r}: not one of the scorers {cfg.router_dir} has values for "
            f"({available_scorers(rd)}; all: {list(SCORERS)}; ifd needs score.ifd=true)"
        )
    # routing features; a scorer without a router (a dense model) gave hidden-state features instead
    X = _features(rd.routing if rd.routing is not None else rd.hidden)
    clusterer = get_clusterer(cfg.method)
    common = dict(
        n_init=cfg.n_init, max_iter=cfg.max_iter, tol=cfg.tol, seed=seed, fit_fraction=cfg.fit_fraction
    )
    if cfg.k:
        k = cfg.k
        if not 1 <= k <= n:
            raise ValueError(f"k={k} outside [1, {n}]")
        fit = fit_k(X, k, clusterer, **common)
        labels, k_choice = fit.labels, "fixed"
        reason = f"fixed k={k} from config"
        curves = {"k": [k], "inertia": [fit.inertia], "silhouette": [_nan_none(fit.silhouette)]}
        inertia, sil = fit.inertia, fit.silhouette
    else:
        ks = [k for k in k_values(cfg.k_range) if k <= n - 1] or [1]
        sweep = sweep_k(
            X,
            ks,
            clusterer,
            num_actors=cfg.num_replicas,
            num_gpus_per_actor=cfg.num_gpus_per_replica,
            **common,
        )
        curves = sweep.curves()
        k, reason = choose_k(sweep.ks, sweep.inertia, sweep.silhouette, cfg.k_choice)
        k_choice = cfg.k_choice
        labels = sweep.labels[k]
        i = sweep.ks.index(k)
        inertia, sil = sweep.inertia[i], sweep.silhouette[i]
    labels = np.asarray(labels, dtype=np.int64)
    # the ranking score, higher = better (see selection/scorers.py)
    quality = scorer_values(rd, cfg.score, groups=rank_groups(rd, cfg.rank_within))

    budget = budget_for(n, cfg.selection_percentage)
    picks = {
        name: get_policy(policy, quality_floor=cfg.quality_floor)(
            quality, labels, budget, ids=rd.ids, seed=seed
        )
        for name, policy in [("selected", cfg.policy), *((b, b) for b in cfg.baselines)]
    }
    wanted = {rd.ids[int(i)] for idx in picks.values() for i in idx}
    messages = fetch_messages(cfg.pool_dir, wanted)
    paths: dict[str, str] = {}
    for name, idx in picks.items():
        path = out / (SELECTED_NAME if name == "selected" else f"selected_{name}.jsonl")
        write_selection_jsonl(
            path, idx, ids=rd.ids, datasets=rd.datasets, scores=quality, labels=labels, messages=messages
        )
        paths[name] = str(path)
    del messages

    sizes = np.bincount(labels, minlength=k)
    sums = np.bincount(labels, weights=quality, minlength=k)
    mean_quality = [float(s / c) if c else None for s, c in zip(sums, sizes)]
    sel_idx = picks["selected"]
    sel_per_cluster = np.bincount(labels[sel_idx], minlength=k)
    inputs = {
        "router_data": fingerprint(Path(cfg.router_dir) / "shards"),
        "pool": fingerprint(Path(cfg.pool_dir) / "shards"),
    }
    counts = {"pool": n, "selected": len(sel_idx), "budget": budget}
    selection = {
        "k_curves": curves,
        "chosen_k": int(k),
        "k_choice": k_choice,
        "reason": reason,
        "method": cfg.method,
        "clusters": {
            "sizes": sizes.tolist(),
            "mean_quality": mean_quality,
            "selected": sel_per_cluster.tolist(),
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
        "chosen": {"inertia": float(inertia), "silhouette": _nan_none(sil)},
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
            mean_quality=[m if m is not None else np.nan for m in mean_quality],
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
            "outputs": sorted(Path(p).name for p in paths.values()),
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
