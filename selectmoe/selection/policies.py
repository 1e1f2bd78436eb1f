"""Selection policies: which rows to keep at a budget. Each returns an int64 index array in selection order.

Within-cluster (and global) ranking is always score descending, ties by id ascending, so the result is a
pure function of (scores, labels, ids, budget, seed). ``ids`` are strings (Arrow or a sequence) or their
precomputed ranks (:func:`id_ranks`, what ``select`` passes: one Arrow sort, no Python sort of strings).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def budget_for(n: int, selection_percentage: float) -> int:
    """``max(1, round(selection_percentage × n))``, capped at ``n`` (Python rounding, half to even)."""
    if n <= 0:
        return 0
    if not 0 < selection_percentage <= 1:
        raise ValueError(f"selection_percentage must be in (0, 1], got {selection_percentage}")
    return min(n, max(1, round(selection_percentage * n)))


def id_ranks(ids) -> np.ndarray | None:
    """Each row's rank in ascending id order (ties: row order), by Arrow's stable C++ sort (UTF-8 byte
    order = code point order, as Python's ``sorted``). An integer array is taken as ranks already made."""
    if ids is None:
        return None
    if isinstance(ids, np.ndarray) and ids.dtype.kind in "iu":
        return ids
    arr = ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(list(ids), pa.string())
    order = pc.sort_indices(arr).to_numpy()
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank


def _rank_order(scores: np.ndarray, ids) -> np.ndarray:
    """Indices sorted by score desc, then id asc (then index asc). ``ids``: strings or their ranks."""
    n = len(scores)
    rank = id_ranks(ids)
    if rank is None:
        rank = np.arange(n)
    return np.lexsort((rank, -np.asarray(scores, dtype=np.float64)))


def _check(scores, labels, budget):
    scores = np.asarray(scores, dtype=np.float64)
    if labels is not None and len(labels) != len(scores):
        raise ValueError(f"{len(labels)} labels for {len(scores)} scores")
    return scores, int(min(max(budget, 0), len(scores)))


def round_robin(scores, labels, budget: int, *, ids=None, seed: int = 0) -> np.ndarray:
    """Clusters in ascending label order, one row from each per round (its best remaining score; ties
    by id asc), skipping exhausted clusters, until ``budget`` rows are taken."""
    scores, budget = _check(scores, labels, budget)
    labels = np.asarray(labels)
    order = _rank_order(scores, ids)
    lab_sorted = labels[order]
    # Position of each row inside its cluster's ranking (stable sort keeps the score/id order).
    by_cluster = np.argsort(lab_sorted, kind="stable")
    lab_grouped = lab_sorted[by_cluster]
    starts = np.r_[0, np.flatnonzero(lab_grouped[1:] != lab_grouped[:-1]) + 1]
    sizes = np.diff(np.r_[starts, len(lab_grouped)])
    within = np.arange(len(lab_grouped)) - np.repeat(starts, sizes)
    rows = order[by_cluster]
    pick = np.lexsort((lab_grouped, within))  # round first, then label ascending
    return rows[pick][:budget].astype(np.int64)


def top_k(scores, labels, budget: int, *, ids=None, seed: int = 0) -> np.ndarray:
    """Global best ``budget`` scores (ties by id asc)."""
    scores, budget = _check(scores, labels, budget)
    return _rank_order(scores, ids)[:budget].astype(np.int64)


def random_policy(scores, labels, budget: int, *, ids=None, seed: int = 0) -> np.ndarray:
    """A seeded uniform sample without replacement (``np.random.default_rng(seed).permutation``)."""
    scores, budget = _check(scores, labels, budget)
    return np.random.default_rng(seed).permutation(len(scores))[:budget].astype(np.int64)


def proportional_quotas(sizes: np.ndarray, weights: np.ndarray, budget: int) -> np.ndarray:
    """Quotas ∝ ``weights`` with largest-remainder rounding (ties: lower cluster index), capped by
    ``sizes``; capacity left by capped clusters is redistributed ∝ weight among the others."""
    sizes = np.asarray(sizes, dtype=np.int64)
    w = np.clip(np.asarray(weights, dtype=np.float64), 0, None)
    w = np.where(np.isfinite(w), w, 0.0)
    budget = int(min(budget, sizes.sum()))
    quota = np.zeros(len(sizes), dtype=np.int64)
    remaining = budget
    while remaining > 0:
        open_ = quota < sizes
        ww = np.where(open_, w, 0.0)
        if ww.sum() <= 0:
            ww = np.where(open_, (sizes - quota).astype(np.float64), 0.0)
        exact = remaining * ww / ww.sum()
        add = np.floor(exact).astype(np.int64)
        left = remaining - int(add.sum())
        if left > 0:
            rem = exact - add
            cand = np.flatnonzero(open_)
            cand = cand[np.lexsort((cand, -rem[cand]))][:left]
            add[cand] += 1
        add = np.minimum(add, sizes - quota)
        quota += add
        remaining = budget - int(quota.sum())
    return quota


def proportional(scores, labels, budget: int, *, ids=None, seed: int = 0) -> np.ndarray:
    """Per-cluster quota ∝ size × mean score (see :func:`proportional_quotas`); each cluster gives its
    best rows. Output order: clusters ascending, best score first within a cluster."""
    scores, budget = _check(scores, labels, budget)
    labels = np.asarray(labels)
    uniq, inv = np.unique(labels, return_inverse=True)
    sizes = np.bincount(inv, minlength=len(uniq))
    means = np.bincount(inv, weights=scores, minlength=len(uniq)) / np.maximum(sizes, 1)
    quota = proportional_quotas(sizes, sizes * means, budget)
    order = _rank_order(scores, ids)
    inv_sorted = inv[order]
    grouped = np.argsort(inv_sorted, kind="stable")
    rows, lab_g = order[grouped], inv_sorted[grouped]
    starts = np.r_[0, np.flatnonzero(lab_g[1:] != lab_g[:-1]) + 1]
    cl_sizes = np.diff(np.r_[starts, len(lab_g)])
    within = np.arange(len(lab_g)) - np.repeat(starts, cl_sizes)
    keep = within < quota[lab_g]
    return rows[keep].astype(np.int64)


def floor_rows(
    scores: np.ndarray, ids, budget: int, quality_floor: float, candidates: np.ndarray | None = None
) -> np.ndarray:
    """Sorted indices of the best ``quality_floor`` share of the pool by score (ties by id): the rows the
    floor policies may take. ``candidates`` (sorted row indices, e.g. ``select.one_answer_per_prompt``'s):
    only those of them inside the floor, so a rule that narrows the candidates removes rows from the floor
    (the next best candidates fill it back up to ``budget``, as many as there are). ``ids``: strings or
    their ranks."""
    if not 0 < quality_floor <= 1:
        raise ValueError(f"quality_floor must be in (0, 1], got {quality_floor}")
    order = _rank_order(scores, ids)
    n_floor = int(np.ceil(quality_floor * len(scores)))
    if candidates is not None:
        allowed = np.zeros(len(scores), dtype=bool)
        allowed[candidates] = True
        n_floor = int(allowed[order[:n_floor]].sum())
        order = order[allowed[order]]
    return np.sort(order[: min(len(order), max(budget, n_floor))])


def quality_round_robin(
    scores, labels, budget: int, *, ids=None, seed: int = 0, quality_floor: float = 0.5, candidates=None
) -> np.ndarray:
    """Score first, then diversity: only the best ``quality_floor`` share of the pool (by score; at least
    ``budget`` rows) is eligible, and :func:`round_robin` spreads the budget over the clusters among them.

    Why: plain round-robin gives a cluster made of bad twins the same quota as a clean one; the floor
    removes the bad rows first, the round-robin keeps every cluster with good rows represented."""
    scores, budget = _check(scores, labels, budget)
    labels = np.asarray(labels)
    rank = id_ranks(ids)  # once: the floor and the round-robin both break ties by it
    eligible = floor_rows(scores, rank, budget, quality_floor, candidates)
    sub_ids = None if rank is None else rank[eligible]
    picked = round_robin(scores[eligible], labels[eligible], budget, ids=sub_ids, seed=seed)
    return eligible[picked].astype(np.int64)


def quality_sample(
    scores, labels, budget: int, *, ids=None, seed: int = 0, quality_floor: float = 0.5, candidates=None
) -> np.ndarray:
    """The quality floor of :func:`quality_round_robin`, then a seeded sample of the eligible rows spread
    round-robin over the clusters (each cluster's rows in a random order, not best score first).

    Why: inside the floor the score has done its job (the known-bad rows are below it); ranking further by
    it takes the most predictable rows, the ones the model already knows, and a finetune learns less from
    them (docs/benchmarks.md, "Which rows inside the quality floor"). The random keys follow row order, as
    :func:`random_policy` does, one per pool row whatever the ``candidates`` (:func:`floor_rows`)."""
    scores, budget = _check(scores, labels, budget)
    labels = np.asarray(labels)
    eligible = floor_rows(scores, ids, budget, quality_floor, candidates)
    return sample_order(eligible, labels, sample_keys(len(scores), seed), budget)


def sample_keys(n: int, seed: int) -> np.ndarray:
    """One seeded uniform key per row, in row order: a row's key does not depend on which rows compete."""
    return np.random.default_rng(seed).random(n)


def sample_order(
    rows: np.ndarray, labels: np.ndarray, keys: np.ndarray, budget: int | None = None
) -> np.ndarray:
    """The first ``budget`` (default all) of ``rows`` in :func:`quality_sample`'s order: highest
    ``keys`` first inside each cluster of ``labels``, round-robin over the clusters."""
    rows = np.asarray(rows, dtype=np.int64)
    return rows[round_robin(keys[rows], labels[rows], len(rows) if budget is None else budget)]


def cluster_mix(labels, indices, k: int) -> dict[str, float]:
    """Diversity of a selection over ``k`` clusters: how many it covers (of the non-empty ones) and the
    entropy of its cluster mix (nats; ``entropy_norm`` = entropy / ln(non-empty clusters), 1 = even)."""
    labels = np.asarray(labels, dtype=np.int64)
    present = int((np.bincount(labels, minlength=k) > 0).sum())
    counts = np.bincount(labels[np.asarray(indices, dtype=np.int64)], minlength=k)
    p = counts[counts > 0] / max(int(counts.sum()), 1)
    entropy = float(-(p * np.log(p)).sum()) if p.size else 0.0
    return {
        "clusters_covered": int((counts > 0).sum()),
        "clusters": present,
        "coverage": float((counts > 0).sum() / max(present, 1)),
        "entropy": entropy,
        "entropy_norm": float(entropy / np.log(present)) if present > 1 else 0.0,
    }


Policy = Callable[..., np.ndarray]
POLICIES: dict[str, Policy] = {
    "quality_sample": quality_sample,
    "quality_round_robin": quality_round_robin,
    "round_robin": round_robin,
    "proportional": proportional,
    "top_k": top_k,
    "random": random_policy,
}
FLOOR_POLICIES = ("quality_sample", "quality_round_robin")  # they take quality_floor and candidates


def get_policy(name: str, *, quality_floor: float | None = None) -> Policy:
    """The policy ``name``; ``quality_floor`` is bound for the two floor policies (ignored by the rest)."""
    try:
        policy = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown selection policy {name!r}; expected one of {sorted(POLICIES)}") from None
    if name in FLOOR_POLICIES and quality_floor is not None:
        return functools.partial(policy, quality_floor=float(quality_floor))
    return policy


def select_indices(
    name: str, scores, labels, selection_percentage: float, *, ids=None, seed: int = 0
) -> tuple[np.ndarray, int]:
    """(indices, budget) for policy ``name`` at ``budget_for(len(scores), selection_percentage)``."""
    budget = budget_for(len(scores), selection_percentage)
    return get_policy(name)(scores, labels, budget, ids=ids, seed=seed), budget
