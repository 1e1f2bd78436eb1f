"""Spherical (cosine) k-means in torch: k-means++ seeding, chunked GEMMs, empty-cluster re-seeding.

Objective: inertia = Σ_i (1 − cos(x_i, c_{label_i})) over L2-normalised rows and unit centroids. Memory is
O(N·D) for the (normalised) data plus O(chunk·K + K·D) working space: every N×K similarity block is
computed chunk by chunk and reduced immediately, never materialised whole.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

# Elements of one [chunk, K] similarity block. CPU: 2 MB in fp32, so small blocks stay in cache and the
# chunk of X they come from is reused at once by index_add_ for the centroid sums. CUDA: 256 MB, so each
# GEMM is large enough to fill the device (a 2 MB block is a few microseconds of an H100: launch-bound).
_BLOCK_ELEMENTS = {"cpu": 1 << 19, "cuda": 1 << 26}
# rows per host->device (or dtype-converting) copy in as_unit_rows: bounds the staging memory
_COPY_ELEMENTS = 1 << 24


def block_elements(device: torch.device | str | None, table: dict[str, int] | None = None) -> int:
    """Elements of one chunk's similarity block on ``device`` (the CPU figure for any non-CUDA device)."""
    table = table or _BLOCK_ELEMENTS
    kind = torch.device(device).type if device is not None else "cpu"
    return table.get(kind, table["cpu"])


@dataclass
class KMeansResult:
    labels: np.ndarray  # int64 [N]
    centroids: np.ndarray  # float32 [K, D], unit rows
    inertia: float  # Σ (1 − cos) at the returned labels/centroids
    n_iter: int  # centroid updates performed in the best restart
    restart: int = 0  # index of the winning restart
    inertias: tuple[float, ...] = ()  # final inertia of every restart


class UnitRows(NamedTuple):
    """Rows already L2-normalised by the caller: :func:`as_unit_rows` passes them through without a copy
    (a sweep actor normalises its sample once and fits every k on it)."""

    t: torch.Tensor


def _is_unit_rows(t: torch.Tensor) -> bool:
    norms = torch.linalg.vector_norm(t, dim=1)
    return bool(((norms - 1).abs() <= 1e-6 * t.shape[1] ** 0.5).logical_or(norms == 0).all())


def as_unit_rows(X, *, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """numpy/torch [N, D] -> torch tensor with L2-normalised rows (zero rows stay zero), on ``device``.

    At most one copy of the matrix is made: numpy input (a read-only memory map included) is copied in
    row chunks straight into the ``dtype`` tensor on ``device`` (no converted host copy first, one
    upload) and normalised in place. A tensor that already is unit rows of ``dtype`` on ``device`` is
    returned as it is, so a caller that fits several k (and the silhouette) prepares X once."""
    if isinstance(X, UnitRows):
        return X.t.to(device=device or X.t.device, dtype=dtype)
    target = torch.device(device) if device is not None else None
    if isinstance(X, np.ndarray):
        if X.ndim != 2:
            raise ValueError(f"expected a 2-D feature matrix, got shape {tuple(X.shape)}")
        out = torch.empty(X.shape, dtype=dtype, device=target)
        step = max(1, _COPY_ELEMENTS // max(1, X.shape[1]))
        with warnings.catch_warnings():  # read-only maps: only read here, never written through
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            for start in range(0, X.shape[0], step):
                out[start : start + step].copy_(torch.from_numpy(X[start : start + step]))
        owned = True
    else:
        t = torch.as_tensor(X)
        out = t.to(device=target if target is not None else t.device, dtype=dtype)
        owned = out is not t
    if out.ndim != 2:
        raise ValueError(f"expected a 2-D feature matrix, got shape {tuple(out.shape)}")
    if not owned and _is_unit_rows(out):
        return out
    norms = torch.linalg.vector_norm(out, dim=1, keepdim=True)
    norms = torch.where(norms > 0, norms, torch.ones_like(norms))
    return out.div_(norms) if owned else out / norms


def _chunk_rows(k: int, device=None) -> int:
    return max(1024, block_elements(device) // max(k, 1))


# MKL's sgemm (the pinned AVX2 branch) takes another code path below 12 output columns: a GEMM of one
# restart's k < 12 centroids rounds differently from the same columns inside a wider GEMM, while from 12
# columns on every column is the same bits whatever its neighbours (tests/test_kmeans.py checks both).
# So runs of k >= _FUSE_MIN_K share one GEMM per chunk of X and smaller ones get their own: a run gives the
# same bits alone or in any lockstep group.
_FUSE_MIN_K = 12


def assign_many(X: torch.Tensor, centroids: list[torch.Tensor], *, sums: list[torch.Tensor] | None = None):
    """Nearest centroid by cosine for unit rows ``X`` under each centroid set -> [(labels int64 [N], best
    cosine [N])], reading X once: every chunk of rows meets all the centroid sets while it is in cache.

    With ``sums`` (one [K, D] per set, zeroed by the caller) the per-cluster row sums of each new
    assignment are accumulated in the same pass (one-hot GEMM), so one lockstep iteration reads X once.
    """
    n = X.shape[0]
    fused = [i for i, C in enumerate(centroids) if C.shape[0] >= _FUSE_MIN_K]
    alone = [i for i, C in enumerate(centroids) if C.shape[0] < _FUSE_MIN_K]
    widths = [C.shape[0] for C in centroids]
    offsets = dict(zip(fused, np.cumsum([0] + [widths[i] for i in fused[:-1]]).tolist()))
    Ct_fused = torch.cat([centroids[i] for i in fused]).t().contiguous() if fused else None
    Ct_alone = {i: centroids[i].t().contiguous() for i in alone}
    step = _chunk_rows(sum(widths), X.device)
    m = min(step, n)
    block = torch.empty(m, Ct_fused.shape[1], dtype=X.dtype, device=X.device) if fused else None  # reused
    small = {i: torch.empty(m, widths[i], dtype=X.dtype, device=X.device) for i in alone}
    labels = [torch.empty(n, dtype=torch.long, device=X.device) for _ in centroids]
    best = [torch.empty(n, dtype=X.dtype, device=X.device) for _ in centroids]
    onehot = (
        {i: torch.empty(m, w, dtype=sums[i].dtype, device=X.device) for i, w in enumerate(widths)}
        if sums is not None
        else None
    )
    for start in range(0, n, step):
        xc = X[start : start + step]
        rows = slice(start, start + xc.shape[0])
        sims = {}
        if fused:
            sim = torch.mm(xc, Ct_fused, out=block[: xc.shape[0]])
            sims = {i: sim[:, offsets[i] : offsets[i] + widths[i]] for i in fused}
        for i in alone:
            sims[i] = torch.mm(xc, Ct_alone[i], out=small[i][: xc.shape[0]])
        for i, sim in sims.items():
            torch.max(sim, dim=1, out=(best[i][rows], labels[i][rows]))
            if sums is not None:
                # Cluster sums as a one-hot GEMM (onehotᵀ · x): deterministic on CUDA, where index_add_
                # uses float atomics. On CPU the caller uses index_add_ instead (_cluster_sums: a full pass
                # is 2.5x faster than this GEMM at N=100k, K=64, D=256, and it is deterministic there).
                hot = onehot[i][: xc.shape[0]].zero_()
                hot.scatter_(1, labels[i][rows, None], 1.0)
                sums[i].addmm_(hot.t(), xc.to(sums[i].dtype))
    return list(zip(labels, best))


def assign(X: torch.Tensor, C: torch.Tensor, *, sums: torch.Tensor | None = None):
    """Nearest centroid by cosine for unit rows ``X`` -> (labels int64 [N], best cosine [N]); ``sums``
    as in :func:`assign_many`."""
    return assign_many(X, [C], sums=None if sums is None else [sums])[0]


def _inertia(best: torch.Tensor) -> float:
    return float((1.0 - best.double()).clamp_min(0).sum())


# k-means++ seeds on at most this many rows per centre (a seeded subsample): seeding is K sequential
# memory-bound passes, so on the full data it costs more than several Lloyd iterations.
_SEED_ROWS_PER_CENTRE = 128


def _kmeanspp(X: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ on cosine distance: the next centre is drawn with probability ∝ 1 − max cos to the
    chosen centres (for unit vectors that is half the squared Euclidean distance, i.e. the classic D²).
    Runs on a subsample of ``128·k`` rows (drawn with ``gen``) when the data is larger."""
    if X.shape[0] > _SEED_ROWS_PER_CENTRE * k:
        sub = torch.randperm(X.shape[0], generator=gen)[: _SEED_ROWS_PER_CENTRE * k]
        X = X[sub.sort().values.to(X.device)]
    n = X.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centres = [first]
    closest = (1.0 - torch.mv(X, X[first])).clamp_min(0).double()
    for _ in range(1, k):
        total = float(closest.sum())
        if total <= 0:  # every remaining point coincides with a centre: pick uniformly
            idx = int(torch.randint(n, (1,), generator=gen))
        else:
            u = float(torch.rand(1, generator=gen, dtype=torch.float64)) * total
            cdf = torch.cumsum(closest.cpu(), 0)
            idx = min(int(torch.searchsorted(cdf, torch.tensor([u], dtype=torch.float64))), n - 1)
        centres.append(idx)
        closest = torch.minimum(closest, (1.0 - torch.mv(X, X[idx])).clamp_min(0).double())
    return X[torch.tensor(centres, device=X.device)].clone()


def _normalise(C: torch.Tensor) -> torch.Tensor:
    norms = torch.linalg.vector_norm(C, dim=1, keepdim=True)
    return C / torch.where(norms > 0, norms, torch.ones_like(norms))


# CPU cluster sums are updated incrementally (add the rows that changed cluster to their new sum,
# subtract them from their old one) while few rows move, which after the first iterations is a small
# fraction of a full index_add_ pass. A full recomputation every _FULL_SUMS_EVERY updates, or when more
# than half the rows moved, bounds the fp32 drift of the running sums.
_FULL_SUMS_EVERY = 8


def _cluster_sums(
    X: torch.Tensor, labels: torch.Tensor, k: int, prev: tuple[torch.Tensor, torch.Tensor] | None
) -> torch.Tensor:
    """Per-cluster row sums [K, D] for ``labels`` (CPU), from ``prev = (labels, sums)`` when cheaper."""
    if prev is not None:
        prev_labels, prev_sums = prev
        moved = torch.nonzero(labels != prev_labels).flatten()
        if 2 * len(moved) <= len(labels):
            sums = prev_sums.clone()
            rows = X[moved]
            sums.index_add_(0, labels[moved], rows)
            sums.index_add_(0, prev_labels[moved], rows, alpha=-1)
            return sums
    sums = torch.zeros(k, X.shape[1], dtype=X.dtype, device=X.device)
    sums.index_add_(0, labels, X)  # one memory-bound pass, deterministic on CPU (no atomics)
    return sums


@dataclass
class _Run:
    """One restart's Lloyd state; :func:`_lloyd_lockstep` advances many of them one iteration at a time."""

    k: int
    C: torch.Tensor
    n_iter: int = 0
    prev_inertia: float | None = None
    prev_labels: torch.Tensor | None = None
    prev_sums: torch.Tensor | None = None
    labels: torch.Tensor | None = None  # final assignment, set when the run stops
    best: torch.Tensor | None = None

    def step(self, X: torch.Tensor, labels, best, sums, tol: float) -> bool:
        """Take one assignment; True when the run has stopped on it, else update the centroids."""
        inertia = _inertia(best)
        # fixed point: C already is the normalised mean of these labels
        fixed_point = self.prev_labels is not None and torch.equal(labels, self.prev_labels)
        converged = (
            self.prev_inertia is not None
            and tol > 0
            and (self.prev_inertia - inertia) <= tol * max(self.prev_inertia, 1e-12)
        )
        if fixed_point or converged:
            self.labels, self.best = labels, best
            self.prev_labels = self.prev_sums = None
            return True
        if not X.is_cuda:
            incremental = self.prev_labels is not None and self.n_iter % _FULL_SUMS_EVERY != 0
            sums = _cluster_sums(
                X, labels, self.k, (self.prev_labels, self.prev_sums) if incremental else None
            )
        self.prev_sums = sums
        counts = torch.bincount(labels, minlength=self.k)
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):
            # Re-seed each empty cluster with one of the points farthest from their own centroid
            # (smallest best cosine), distinct points, farthest first; ties broken by index (stable sort).
            far = torch.argsort(best, stable=True)[: len(empty)]
            sums = sums.clone()
            sums[empty] = X[far].to(sums.dtype)
        self.C = _normalise(sums)
        self.prev_inertia, self.prev_labels = inertia, labels
        self.n_iter += 1
        return False


def _lloyd_lockstep(X: torch.Tensor, runs: list[_Run], max_iter: int, tol: float) -> None:
    """Advance every run to its stop, all still-running runs assigned in one pass over X per iteration.
    Each run's arithmetic is exactly that of running it alone (see _FUSE_MIN_K)."""
    active = list(runs)
    for _ in range(max_iter):
        if not active:
            return
        sums = (
            [torch.zeros(r.k, X.shape[1], dtype=X.dtype, device=X.device) for r in active]
            if X.is_cuda
            else None
        )
        out = assign_many(X, [r.C for r in active], sums=sums)
        active = [
            r
            for j, (r, (labels, best)) in enumerate(zip(active, out))
            if not r.step(X, labels, best, sums[j] if sums is not None else None, tol)
        ]
    # max_iter reached: the returned labels are the nearest-centroid assignment of the last centroids
    for r, (labels, best) in zip(active, assign_many(X, [r.C for r in active]) if active else []):
        r.labels, r.best = labels, best


def spherical_kmeans(
    X,
    k: int,
    *,
    n_init: int = 1,
    max_iter: int = 300,
    tol: float = 1e-4,
    seed: int = 0,
    device=None,
) -> KMeansResult:
    """Cosine k-means on the L2-normalised rows of ``X`` (numpy or torch, any float dtype).

    Each restart ``r`` seeds with k-means++ (cosine distance) from its own ``torch.Generator`` seeded
    with ``seed + r``; the restart with the lowest inertia wins (ties: the lowest ``r``). An iteration
    assigns every row to its most similar centroid (chunked fp32 ``torch.mm``), accumulates the cluster
    sums (CPU: ``index_add_``, incremental over the rows that moved; CUDA: a one-hot GEMM in the same
    pass, deterministic unlike CUDA ``index_add_``) and renormalises them. k-means++ runs on a seeded
    subsample of at most 128·k rows.
    An empty cluster is re-seeded with the points farthest from their assigned centroid (lowest cosine),
    one distinct point per empty cluster.
    Stops at a label fixed point, when the relative inertia decrease is ≤ ``tol`` (``tol=0`` disables
    this test), or after ``max_iter`` updates; the returned labels are always the nearest-centroid
    assignment of the returned centroids and ``inertia`` is Σ(1 − cos) of exactly that assignment.
    Deterministic for a seed on a given device/thread count.
    """
    return spherical_kmeans_many(X, [k], n_init=n_init, max_iter=max_iter, tol=tol, seed=seed, device=device)[
        int(k)
    ]


def spherical_kmeans_many(
    X,
    ks,
    *,
    n_init: int = 1,
    max_iter: int = 300,
    tol: float = 1e-4,
    seed: int = 0,
    device=None,
) -> dict[int, KMeansResult]:
    """:func:`spherical_kmeans` for every k in ``ks``, in lockstep: all restarts of all k advance together
    and each Lloyd iteration reads X once for all of them (the k sweep's cost on CPU is reading X, not the
    arithmetic, for the small k). Each k's result is the one ``spherical_kmeans(X, k)`` returns."""
    Xt = as_unit_rows(X, device=device)
    n = Xt.shape[0]
    ks = [int(k) for k in dict.fromkeys(ks)]
    for k in ks:
        if not 1 <= k <= n:
            raise ValueError(f"k must be in [1, {n}] for {n} rows, got {k}")
    restarts = range(max(1, n_init))
    runs = {
        (k, r): _Run(k, _kmeanspp(Xt, k, torch.Generator(device="cpu").manual_seed(int(seed) + r)))
        for k in ks
        for r in restarts
    }
    _lloyd_lockstep(Xt, list(runs.values()), max_iter, tol)
    out = {}
    for k in ks:
        inertias = [_inertia(runs[k, r].best) for r in restarts]
        r = int(np.argmin(inertias))  # ties: the lowest restart
        best = runs[k, r]
        out[k] = KMeansResult(
            labels=best.labels.cpu().numpy(),
            centroids=best.C.float().cpu().numpy(),
            inertia=inertias[r],
            n_iter=best.n_iter,
            restart=r,
            inertias=tuple(inertias),
        )
    return out


def assign_to_centroids(X, centroids, *, device=None) -> tuple[np.ndarray, float]:
    """Nearest-centroid labels (int64) and Σ(1 − cos) for every row of ``X``."""
    Xt = as_unit_rows(X, device=device)
    C = as_unit_rows(centroids, device=Xt.device)
    labels, best = assign(Xt, C)
    return labels.cpu().numpy(), _inertia(best)
