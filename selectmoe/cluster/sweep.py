"""k sweep on Ray actors: every integer k in a range, k-means (n_init restarts) + exact silhouette per k.

The feature matrix is ``ray.put`` once and shared zero-copy by every actor. Tasks are handed out
largest k first (the most expensive) to whichever actor frees up (``ray.wait`` loop), so the tail of
the sweep is made of cheap small-k fits. Every task is deterministic for its (k, seed), so results do
not depend on the schedule; the labels of the chosen k are the sweep's own (no refit).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from selectmoe.cluster.kmeans import assign_to_centroids
from selectmoe.cluster.silhouette import cosine_silhouette

logger = logging.getLogger(__name__)


@dataclass
class KFit:
    k: int
    inertia: float
    silhouette: float  # NaN when undefined (fewer than 2 non-empty clusters, or k >= N)
    labels: np.ndarray  # int32 [N]
    n_iter: int
    seconds: float


@dataclass
class SweepResult:
    ks: list[int]
    inertia: list[float]
    silhouette: list[float]
    labels: dict[int, np.ndarray] = field(repr=False)
    n_iter: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    def curves(self) -> dict[str, list]:
        return {
            "k": list(self.ks),
            "inertia": [float(v) for v in self.inertia],
            "silhouette": [None if np.isnan(v) else float(v) for v in self.silhouette],
        }


def k_values(k_range: Sequence[int]) -> list[int]:
    """Every integer k in ``[lo, hi]`` (inclusive); a single value means just that k."""
    vals = [int(v) for v in k_range]
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or vals[0] < 1 or vals[1] < vals[0]:
        raise ValueError(f"k_range must be [lo, hi] with 1 <= lo <= hi, got {list(k_range)}")
    return list(range(vals[0], vals[1] + 1))


def fit_k(
    X: np.ndarray,
    k: int,
    clusterer: Callable,
    *,
    n_init: int = 1,
    max_iter: int = 300,
    tol: float = 1e-4,
    seed: int = 0,
    fit_fraction: float = 1.0,
    device=None,
) -> KFit:
    """One sweep task. ``fit_fraction < 1``: fit on a seeded sample of rows, then assign all rows to the
    nearest centroid; inertia and silhouette are always over all rows."""
    t0 = time.perf_counter()
    n = X.shape[0]
    if fit_fraction < 1.0:
        m = max(k, round(fit_fraction * n))
        idx = np.sort(np.random.default_rng(seed).choice(n, size=min(m, n), replace=False))
        res = clusterer(X[idx], k, n_init=n_init, max_iter=max_iter, tol=tol, seed=seed, device=device)
        labels, inertia = assign_to_centroids(X, res.centroids, device=device)
    else:
        res = clusterer(X, k, n_init=n_init, max_iter=max_iter, tol=tol, seed=seed, device=device)
        labels, inertia = np.asarray(res.labels), float(res.inertia)
    try:
        sil = cosine_silhouette(X, labels, device=device)
    except ValueError:
        sil = float("nan")
    return KFit(
        k=int(k),
        inertia=float(inertia),
        silhouette=float(sil),
        labels=labels.astype(np.int32),
        n_iter=int(getattr(res, "n_iter", 0)),
        seconds=time.perf_counter() - t0,
    )


class _SweepWorker:
    def __init__(self, clusterer: Callable, device=None, cpu_threads: int = 1):
        import torch

        self.clusterer = clusterer
        self.device = device
        torch.set_num_threads(cpu_threads)  # the actor's num_cpus, never an inherited OMP_NUM_THREADS

    def fit(self, X, k, params):
        return fit_k(X, k, self.clusterer, device=self.device, **params)


def sweep_k(
    X: np.ndarray,
    ks: Sequence[int],
    clusterer: Callable | None = None,
    *,
    n_init: int = 1,
    max_iter: int = 300,
    tol: float = 1e-4,
    seed: int = 0,
    fit_fraction: float = 1.0,
    num_actors: int = 2,
    num_gpus_per_actor: float = 0.25,
    use_ray: bool = True,
    progress: bool | None = None,
) -> SweepResult:
    """Fit every k in ``ks``; returns per-k inertia, silhouette and int32 labels (sorted by k).

    Actors request ``num_gpus=num_gpus_per_actor`` (device ``cuda``) when the connected Ray cluster
    has GPUs, else ``num_cpus=1``. ``use_ray=False`` runs the same tasks in-process (tests, tiny pools).
    ``progress``: a bar of fitted k on stderr (``None``: on a terminal only).
    """
    from tqdm.auto import tqdm

    from selectmoe.cluster.registry import get_clusterer

    clusterer = clusterer or get_clusterer("spherical_kmeans")
    ks = sorted({int(k) for k in ks}, reverse=True)  # largest first
    params = dict(n_init=n_init, max_iter=max_iter, tol=tol, seed=seed, fit_fraction=fit_fraction)
    X = np.ascontiguousarray(X, dtype=np.float32)
    t0 = time.perf_counter()
    fits: dict[int, KFit] = {}
    bar = tqdm(
        total=len(ks),
        desc="k sweep",
        unit=" k",
        file=sys.stderr,
        disable=None if progress is None else not progress,
    )

    def record(fit: KFit) -> None:
        fits[fit.k] = fit
        logger.info(
            "k=%d inertia=%.4f silhouette=%.4f (%.2fs)", fit.k, fit.inertia, fit.silhouette, fit.seconds
        )
        bar.set_postfix(k=fit.k, silhouette=f"{fit.silhouette:.3f}", refresh=False)
        bar.update()

    if not use_ray:
        for k in ks:
            record(fit_k(X, k, clusterer, **params))
    else:
        import ray

        from selectmoe.ray_utils import cluster_gpus, init_ray

        if not ray.is_initialized():
            init_ray()
        gpu = cluster_gpus() > 0
        opts = {"num_gpus": num_gpus_per_actor} if gpu else {"num_cpus": 1}
        Actor = ray.remote(_SweepWorker).options(**opts)
        actors = [
            Actor.remote(clusterer, "cuda" if gpu else None) for _ in range(max(1, min(num_actors, len(ks))))
        ]
        x_ref = ray.put(X)
        pending = list(ks)
        running: dict = {}
        for actor in actors:
            if pending:
                k = pending.pop(0)
                running[actor.fit.remote(x_ref, k, params)] = (actor, k)
        try:
            while running:
                ready, _ = ray.wait(list(running), num_returns=1)
                ref = ready[0]
                actor, _ = running.pop(ref)
                record(ray.get(ref))
                if pending:
                    nk = pending.pop(0)
                    running[actor.fit.remote(x_ref, nk, params)] = (actor, nk)
        finally:
            for actor in actors:
                ray.kill(actor)
    bar.close()
    order = sorted(fits)
    return SweepResult(
        ks=order,
        inertia=[fits[k].inertia for k in order],
        silhouette=[fits[k].silhouette for k in order],
        labels={k: fits[k].labels for k in order},
        n_iter=[fits[k].n_iter for k in order],
        seconds=[fits[k].seconds for k in order],
        wall_s=time.perf_counter() - t0,
    )
