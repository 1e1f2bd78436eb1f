"""Targeted selection (RDS+, Ivison et al. 2025): rank pool rows by cosine similarity to target examples.

Each pool row gets, per target task, its best cosine similarity to one of that task's examples
(:func:`best_similarity`, computed block by block over the router-data shards by
:mod:`selectmoe.selection.similarity`). :func:`targeted_round_robin` then fills the budget round-robin
over the target tasks, each task taking its most similar row not yet taken, among the rows inside the
default policy's quality floor only: a bad row is never selected for being near a target.

Features: ``select.features`` (routing, hidden or both), normalised exactly as clustering normalises them
(:func:`selectmoe.cluster.features.unit_features`), so a target example and a pool row are compared in
the space the clusters live in.
"""

from __future__ import annotations

import numpy as np

from selectmoe.selection.policies import _check, floor_rows, id_ranks

TARGETED = "targeted"  # the policy name (select.policy / select.baselines)


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


def targeted_round_robin(
    scores, similarity, budget: int, *, ids=None, quality_floor: float = 0.5
) -> np.ndarray:
    """Indices in selection order: round-robin over the target tasks (columns of ``similarity [N, T]``,
    in column order), each taking its most similar row not yet taken (ties by id asc), among the best
    ``quality_floor`` share of the pool by ``scores`` (at least ``budget`` rows; the floor of
    :func:`~selectmoe.selection.policies.quality_sample`). ``ids``: strings or their ranks
    (:func:`~selectmoe.selection.policies.id_ranks`)."""
    scores, budget = _check(scores, None, budget)
    similarity = np.asarray(similarity, dtype=np.float64)
    if similarity.ndim != 2 or similarity.shape[0] != len(scores):
        raise ValueError(f"similarity has shape {similarity.shape}, expected [{len(scores)}, tasks]")
    if similarity.shape[1] == 0:
        raise ValueError("targeted selection needs at least one target task")
    n = len(scores)
    rank = id_ranks(ids)  # once: the floor and the similarity order both break ties by it
    eligible = floor_rows(scores, rank, budget, quality_floor)
    tie = (np.arange(n) if rank is None else rank)[eligible]
    sub = np.where(np.isfinite(similarity[eligible]), similarity[eligible], -np.inf)
    orders = [eligible[np.lexsort((tie, -sub[:, t]))] for t in range(sub.shape[1])]
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
