"""k sweep on Ray actors: every integer k in a range, k-means (n_init restarts) + cosine silhouette per k.

The fit sample (float16, the feature blocks side by side) is ``ray.put`` once; each actor normalises it
once (:func:`selectmoe.cluster.features.unit_features`, float32) and fits every k it is handed on that
one tensor, never a copy per k. Silhouette: exact over the sample when it has at most ``silhouette_rows``
rows, else over a seeded subsample of that many (the same rows for every k), with its standard error
(std / sqrt(rows); 0 when the silhouette covers the whole pool).

Actors are planned against the cluster first (:mod:`selectmoe.placement`: fitted with a notice or refused,
never a hang), GPU actors spread one per GPU. A task is a group of up to ``K_PER_TASK`` consecutive k (fewer
when the sweep is short, so every requested actor gets work), fitted in lockstep (:func:`selectmoe.cluster.kmeans.spherical_kmeans_many`: the sample is read once per iteration for
the whole group); groups are handed out largest k first to whichever actor frees up, so the tail of the
sweep is made of cheap small-k fits. The groups are a fixed function of the k values and the requested
actor count (never of what the cluster has), and every task is deterministic for its (group, seed), so
results do not depend on the schedule (on CPU a k's result does not depend on its group either).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from selectmoe.cluster.features import unit_features
from selectmoe.cluster.kmeans import UnitRows
from selectmoe.cluster.registry import fit_many
from selectmoe.cluster.silhouette import cosine_silhouette_samples

logger = logging.getLogger(__name__)

# Most k values per sweep task. Lockstep pays while several k share each pass over the sample; measured
# in docs/benchmarks.md ("Scale").
K_PER_TASK = 8


@dataclass
class KFit:
    k: int
    inertia: float  # Σ(1 − cos) over the fit sample
    silhouette: float  # NaN when undefined (fewer than 2 non-empty clusters, or k >= rows)
    silhouette_se: float  # standard error of the silhouette estimate (0: exact over the pool)
    labels: np.ndarray  # int32 [sample rows]
    centroids: np.ndarray  # float32 [k, F], unit rows
    n_iter: int
    seconds: float  # its share of its lockstep group's k-means time, plus its own silhouette


@dataclass
class SweepResult:
    ks: list[int]
    inertia: list[float]
    silhouette: list[float]
    silhouette_se: list[float]
    labels: dict[int, np.ndarray] = field(repr=False)
    centroids: dict[int, np.ndarray] = field(repr=False)
    n_iter: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    n_actors: int = 0
    notices: list[str] = field(default_factory=list)

    def curves(self) -> dict[str, list]:
        def clean(values):
            return [None if np.isnan(v) else float(v) for v in values]

        return {
            "k": list(self.ks),
            "inertia": [float(v) for v in self.inertia],
            "silhouette": clean(self.silhouette),
            "silhouette_se": clean(self.silhouette_se),
        }


def k_values(k_range: Sequence[int]) -> list[int]:
    """Every integer k in ``[lo, hi]`` (inclusive); a single value means just that k."""
    vals = [int(v) for v in k_range]
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or vals[0] < 1 or vals[1] < vals[0]:
        raise ValueError(f"k_range must be [lo, hi] with 1 <= lo <= hi, got {list(k_range)}")
    return list(range(vals[0], vals[1] + 1))


def silhouette_rows_of(n_sample: int, silhouette_rows: int, seed: int) -> np.ndarray | None:
    """Sorted sample rows the silhouette is computed on (None: all of them)."""
    if silhouette_rows <= 0 or n_sample <= silhouette_rows:
        return None
    return np.sort(np.random.default_rng(seed + 1).choice(n_sample, size=silhouette_rows, replace=False))


def k_groups(ks: Sequence[int], num_actors: int = 1) -> list[list[int]]:
    """The sweep's tasks: ``ks`` largest first, cut into groups of consecutive values, at most
    ``K_PER_TASK`` and at least one group per requested actor where there are enough k. ``num_actors`` is
    the requested count, not the placed one: a GPU sweep's groups (whose GEMM shapes decide its rounding)
    are the same on every cluster."""
    order = sorted({int(k) for k in ks}, reverse=True)
    per_task = max(1, min(K_PER_TASK, math.ceil(len(order) / max(1, num_actors))))
    return [order[i : i + per_task] for i in range(0, len(order), per_task)]


def fit_ks(
    X: UnitRows,
    ks: Sequence[int],
    clusterer: Callable,
    *,
    n_init: int = 1,
    max_iter: int = 300,
    tol: float = 1e-4,
    seed: int = 0,
    device=None,
    sil_rows: np.ndarray | None = None,
    sil_X: UnitRows | None = None,
    exact: bool = True,
) -> list[KFit]:
    """One sweep task on unit rows ``X``: every k of ``ks`` fitted together (:func:`fit_many`), then each
    one's silhouette over ``sil_X`` (rows ``sil_rows`` of X) or all of X. ``exact``: the silhouette rows
    are the whole pool (standard error 0)."""
    t0 = time.perf_counter()
    results = fit_many(clusterer, X, ks, n_init=n_init, max_iter=max_iter, tol=tol, seed=seed, device=device)
    fit_share = (time.perf_counter() - t0) / max(1, len(results))
    fits = []
    for k, res in results.items():
        t1 = time.perf_counter()
        labels = np.asarray(res.labels)
        try:
            s = cosine_silhouette_samples(
                sil_X if sil_rows is not None else X, labels[sil_rows] if sil_rows is not None else labels,
                device=device,
            )  # fmt: skip
            sil = float(s.mean())
            se = 0.0 if exact else float(s.std(ddof=1) / math.sqrt(len(s))) if len(s) > 1 else float("nan")
        except ValueError:
            sil = se = float("nan")
        fits.append(
            KFit(
                k=int(k),
                inertia=float(res.inertia),
                silhouette=sil,
                silhouette_se=se,
                labels=labels.astype(np.int32),
                centroids=np.asarray(res.centroids, np.float32),
                n_iter=int(getattr(res, "n_iter", 0)),
                seconds=fit_share + time.perf_counter() - t1,
            )
        )
    return fits


class _SweepWorker:
    """Holds the normalised sample (and the silhouette subsample) once; fits any k on it."""

    def __init__(
        self,
        sample,
        widths: Sequence[int] | None,
        clusterer: Callable,
        device=None,
        cpu_threads: int = 1,
        silhouette_rows: int = 0,
        seed: int = 0,
        n_pool: int | None = None,
    ):
        import torch

        torch.set_num_threads(cpu_threads)  # the actor's num_cpus, never an inherited OMP_NUM_THREADS
        self.clusterer, self.device = clusterer, device
        self.X = unit_features(sample, widths, device=device)
        n = self.X.t.shape[0]
        self.sil_rows = silhouette_rows_of(n, silhouette_rows, seed)
        self.sil_X = None if self.sil_rows is None else UnitRows(self.X.t[self.sil_rows])
        n_sil = n if self.sil_rows is None else len(self.sil_rows)
        self.exact = n_sil == (n_pool if n_pool is not None else n)

    def fit(self, ks: Sequence[int], params) -> list[KFit]:
        return fit_ks(
            self.X, ks, self.clusterer, device=self.device, sil_rows=self.sil_rows, sil_X=self.sil_X,
            exact=self.exact, **params,
        )  # fmt: skip


def sweep_k(
    X: np.ndarray,
    ks: Sequence[int],
    clusterer: Callable | None = None,
    *,
    widths: Sequence[int] | None = None,
    n_init: int = 1,
    max_iter: int = 300,
    tol: float = 1e-4,
    seed: int = 0,
    silhouette_rows: int = 0,
    n_pool: int | None = None,
    num_actors: int = 2,
    num_gpus_per_actor: float = 0.25,
    use_ray: bool = True,
    progress: bool | None = None,
    actors_key: str = "select.num_replicas",
    memory_key: str = "select.fit_sample_rows",
) -> SweepResult:
    """Fit every k in ``ks`` on the rows of ``X`` (the fit sample; any float dtype, feature blocks of
    ``widths`` side by side); returns per-k inertia, silhouette (+ standard error), int32 labels of the
    sample rows and the centroids (sorted by k).

    ``silhouette_rows``: above this many sample rows the silhouette runs on a seeded subsample (0: all).
    ``n_pool``: the pool's size (the silhouette is exact only when it covers the whole pool).
    Actors: ``num_actors`` fitted to the cluster (:func:`selectmoe.placement.plan_actors`), GPU actors
    one per GPU; ``use_ray=False`` runs the same tasks in-process (tests, fixed k, tiny pools).
    ``progress``: a bar of fitted k on stderr (``None``: on a terminal only).
    """
    from tqdm.auto import tqdm

    from selectmoe.cluster.registry import get_clusterer

    clusterer = clusterer or get_clusterer("spherical_kmeans")
    groups = k_groups(ks, num_actors)
    params = dict(n_init=n_init, max_iter=max_iter, tol=tol, seed=seed)
    worker_args = dict(widths=widths, silhouette_rows=silhouette_rows, seed=seed, n_pool=n_pool)
    t0 = time.perf_counter()
    fits: dict[int, KFit] = {}
    notices: list[str] = []
    n_actors = 0
    bar = tqdm(
        total=sum(len(group) for group in groups),
        desc="k sweep",
        unit=" k",
        file=sys.stderr,
        disable=None if progress is None else not progress,
    )

    def record(fit: KFit) -> None:
        fits[fit.k] = fit
        logger.info(
            "k=%d inertia=%.4f silhouette=%.4f±%.4f (%.2fs)",
            fit.k, fit.inertia, fit.silhouette, fit.silhouette_se, fit.seconds,
        )  # fmt: skip
        bar.set_postfix(k=fit.k, silhouette=f"{fit.silhouette:.3f}", refresh=False)
        bar.update()

    if not use_ray:
        worker = _SweepWorker(X, clusterer=clusterer, **worker_args)
        n_actors = 1
        for group in groups:
            for fit in worker.fit(group, params):
                record(fit)
        del worker
    else:
        import ray
        from ray.util.placement_group import remove_placement_group

        from selectmoe.placement import place_actors, plan_actors
        from selectmoe.ray_utils import init_ray

        if not ray.is_initialized():
            init_ray()
        # memory per actor: its float32 copy of the sample, the silhouette subsample and working space
        per_actor = 2.5 * X.shape[0] * X.shape[1] * 4
        plan = plan_actors(
            actors_key,
            num_actors,
            gpus_per_actor=num_gpus_per_actor,
            memory_per_actor=per_actor,
            memory_key=memory_key,
        )
        plan.n_actors = min(plan.n_actors, len(groups))  # no idle actor for a short sweep
        plan.n_bundles = min(plan.n_bundles, plan.n_actors)
        notices, n_actors = plan.notices, plan.n_actors
        gpu = plan.gpus_per_actor > 0
        x_ref = ray.put(np.ascontiguousarray(X))
        actors, pg = place_actors(
            _SweepWorker,
            plan,
            (
                x_ref,
                worker_args["widths"],
                clusterer,
                "cuda" if gpu else None,
                1,
                silhouette_rows,
                seed,
                n_pool,
            ),
            key=actors_key,
        )
        pending = list(groups)
        running: dict = {}
        for actor in actors:
            if pending:
                running[actor.fit.remote(pending.pop(0), params)] = actor
        try:
            while running:
                ready, _ = ray.wait(list(running), num_returns=1)
                ref = ready[0]
                actor = running.pop(ref)
                for fit in ray.get(ref):
                    record(fit)
                if pending:
                    running[actor.fit.remote(pending.pop(0), params)] = actor
        finally:
            for actor in actors:
                ray.kill(actor)
            remove_placement_group(pg)
            del x_ref
    bar.close()
    order = sorted(fits)
    return SweepResult(
        ks=order,
        inertia=[fits[k].inertia for k in order],
        silhouette=[fits[k].silhouette for k in order],
        silhouette_se=[fits[k].silhouette_se for k in order],
        labels={k: fits[k].labels for k in order},
        centroids={k: fits[k].centroids for k in order},
        n_iter=[fits[k].n_iter for k in order],
        seconds=[fits[k].seconds for k in order],
        wall_s=time.perf_counter() - t0,
        n_actors=n_actors,
        notices=notices,
    )
