"""Targeted selection: toward target examples, inside the default policy's quality floor.

Each pool row gets, per target task, its best cosine similarity to one of that task's examples
(:func:`best_similarity`, computed block by block over the router-data shards by
:mod:`selectmoe.selection.similarity`). Two policies then fill the budget round-robin over the target tasks,
among the rows inside the default policy's quality floor only (a bad row is never selected for being near a
target):

- ``rds`` (:func:`nearest_round_robin`): RDS+ (Ivison et al. 2025) as published: each task takes its most
  similar row not yet taken.
- ``targeted`` (:func:`targeted_sample`): each task first takes its *neighbourhood*, the rows at least as
  near one of its examples as its least typical example is to the rest (:func:`neighbourhood_thresholds`),
  in the default policy's order (a seeded sample spread over the clusters); then, past it, the nearest rows.

Why the neighbourhood: the target says *where* in the pool to select, not which rows there. Nearest-first
takes the rows most like the few target examples, and on the demo that costs accuracy against the default's
sample of the same rows (docs/benchmarks.md, "Where to select, and which rows there"); when the target
resembles the whole pool, the neighbourhood is most of the floor and ``targeted`` stays the default.

Features: ``select.features`` (routing, hidden or both), normalised exactly as clustering normalises them
(:func:`selectmoe.cluster.features.unit_features`), so a target example and a pool row are compared in
the space the clusters live in.
"""

from __future__ import annotations

import numpy as np

from selectmoe.selection.policies import _check, floor_rows, id_ranks, sample_keys, sample_order

TARGETED = "targeted"  # the policy names (select.policy / select.baselines)
RDS = "rds"
TARGET_POLICIES = (TARGETED, RDS)


def best_similarity(pool_rows: np.ndarray, target_rows: np.ndarray, target_task: np.ndarray, n_tasks: int):
    """float32 ``[n, n_tasks]``: each pool row's highest cosine similarity to an example of each task.

    Both inputs are unit rows (:func:`selectmoe.selection.similarity.unit_rows`); ``target_task[j]`` is
    example ``j``'s task index."""
    sims = np.asarray(pool_rows, np.float32) @ np.asarray(target_rows, np.float32).T  # [n, T]
    out = np.full((sims.shape[0], n_tasks), -np.inf, dtype=np.float32)
    task = np.asarray(target_task, dtype=np.int64)
    for t in range(n_tasks):
        cols = np.flatnonzero(task == t)
        if cols.size:
            out[:, t] = sims[:, cols].max(axis=1)
    return out


def neighbourhood_thresholds(target_rows: np.ndarray, target_task, n_tasks: int) -> np.ndarray:
    """float32 ``[n_tasks]``: per task, the lowest similarity of one of its examples to its nearest other
    example of the task. A pool row whose best similarity to the task reaches it is as near the task as the
    task's least typical example is to the rest. The minimum, so one outlying example widens the
    neighbourhood (toward the default's sample, the safe side); an example given twice is its own nearest
    sibling (similarity 1). A task with one example has no spread to measure: ``inf`` (no neighbourhood;
    :func:`targeted_sample` takes its rows nearest first)."""
    rows = np.asarray(target_rows, np.float32)
    task = np.asarray(target_task, dtype=np.int64)
    out = np.full(n_tasks, np.inf, dtype=np.float32)
    for t in range(n_tasks):
        cols = np.flatnonzero(task == t)
        if cols.size > 1:
            sims = rows[cols] @ rows[cols].T
            np.fill_diagonal(sims, -np.inf)
            out[t] = sims.max(axis=1).min()
    return out


def _similarity(similarity, n: int) -> np.ndarray:
    similarity = np.asarray(similarity, dtype=np.float64)
    if similarity.ndim != 2 or similarity.shape[0] != n:
        raise ValueError(f"similarity has shape {similarity.shape}, expected [{n}, tasks]")
    if similarity.shape[1] == 0:
        raise ValueError("targeted selection needs at least one target task")
    return np.where(np.isfinite(similarity), similarity, -np.inf)


def _nearest_first(rows: np.ndarray, similarity: np.ndarray, tie: np.ndarray) -> np.ndarray:
    """``rows`` by ``similarity`` descending, ties by ``tie`` ascending."""
    return rows[np.lexsort((tie[rows], -similarity[rows]))]


def _take_round_robin(orders: list[np.ndarray], budget: int, n: int) -> np.ndarray:
    """Round-robin over ``orders`` (one row order per task), each turn the task's next row not yet taken,
    until ``budget`` rows or every order is spent."""
    taken = np.zeros(n, dtype=bool)
    cursor = [0] * len(orders)
    picked: list[int] = []
    while len(picked) < budget:
        progressed = False
        for t, order in enumerate(orders):
            if len(picked) >= budget:
                break
            while cursor[t] < len(order) and taken[order[cursor[t]]]:
                cursor[t] += 1
            if cursor[t] < len(order):
                row = int(order[cursor[t]])
                taken[row] = True
                picked.append(row)
                progressed = True
        if not progressed:
            break
    return np.asarray(picked, dtype=np.int64)


def nearest_round_robin(
    scores, similarity, budget: int, *, ids=None, quality_floor: float = 0.5, candidates=None
) -> np.ndarray:
    """RDS+: indices in selection order, round-robin over the target tasks (columns of ``similarity
    [N, T]``, in column order), each taking its most similar row not yet taken (ties by id asc), among the
    best ``quality_floor`` share of the pool by ``scores`` (at least ``budget`` rows; the floor of
    :func:`~selectmoe.selection.policies.quality_sample`, ``candidates`` as there). ``ids``: strings or their
    ranks (:func:`~selectmoe.selection.policies.id_ranks`)."""
    scores, budget = _check(scores, None, budget)
    n = len(scores)
    similarity = _similarity(similarity, n)
    rank = id_ranks(ids)  # once: the floor and the similarity order both break ties by it
    tie = np.arange(n) if rank is None else rank
    eligible = floor_rows(scores, rank, budget, quality_floor, candidates)
    orders = [_nearest_first(eligible, similarity[:, t], tie) for t in range(similarity.shape[1])]
    return _take_round_robin(orders, budget, n)


def targeted_sample(
    scores,
    labels,
    similarity,
    thresholds,
    budget: int,
    *,
    ids=None,
    seed: int = 0,
    quality_floor: float = 0.5,
    candidates=None,
) -> np.ndarray:
    """Indices in selection order, round-robin over the target tasks (columns of ``similarity [N, T]``),
    among the rows of the quality floor of :func:`nearest_round_robin` (``candidates`` as there). Each task's
    order: first its neighbourhood (rows with ``similarity >= thresholds[t]``,
    :func:`neighbourhood_thresholds`) as :func:`~selectmoe.selection.policies.quality_sample` orders rows
    (seeded random keys in row order, round-robin over the clusters ``labels``), then the rest of the floor
    nearest first (ties by id)."""
    scores, budget = _check(scores, labels, budget)
    n = len(scores)
    similarity = _similarity(similarity, n)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.shape != (similarity.shape[1],):
        raise ValueError(f"{thresholds.shape} thresholds for {similarity.shape[1]} target tasks")
    labels = np.asarray(labels)
    rank = id_ranks(ids)
    tie = np.arange(n) if rank is None else rank
    eligible = floor_rows(scores, rank, budget, quality_floor, candidates)
    keys = sample_keys(n, seed)  # quality_sample's keys: one draw, shared by every task
    orders = []
    for t, threshold in enumerate(thresholds):
        near = similarity[eligible, t] >= threshold
        inside, outside = eligible[near], eligible[~near]
        orders.append(
            np.concatenate(
                [sample_order(inside, labels, keys), _nearest_first(outside, similarity[:, t], tie)]
            )
        )
    return _take_round_robin(orders, budget, n)
