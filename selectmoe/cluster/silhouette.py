"""Exact cosine silhouette in O(N·K·D) instead of O(N²·D).

For unit rows the summed cosine distance from x to a cluster C is
Σ_{j∈C} (1 − x·x_j) = |C| − x·S_C with S_C = Σ_{j∈C} x_j, so one [N, K] GEMM against the K cluster sums
gives every a(i) and b(i) exactly:

    a(i) = (|C_i| − x·S_{C_i} − (1 − x·x)) / (|C_i| − 1)        (own point removed)
    b(i) = min_{C ≠ C_i} (|C| − x·S_C) / |C|
    s(i) = (b − a) / max(a, b),  0 for singletons

This equals ``sklearn.metrics.silhouette_score(X, labels, metric="cosine")``. Zero rows follow
sklearn's cosine distance: a zero row is at distance 1 from every other row (its normalised form is
the zero vector, so x·x_j = 0) and at distance 0 from itself (the own term 1 − x·x = 1 is removed from
its a-sum, so a = b = 1 and s = 0 for a zero row in a cluster of normal rows). Cluster sums are accumulated in float64; the GEMM runs in ``dtype`` (default:
float64 for float64 input, else float32).
"""

from __future__ import annotations

import numpy as np
import torch

from selectmoe.cluster.kmeans import as_unit_rows, block_elements

# Elements of one [chunk, K] distance block: 16 MB fp64 on CPU (cache-friendly), 256 MB on CUDA (large GEMMs)
_BLOCK_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 25}


def _prepare(X, labels, dtype, device):
    if dtype is None:
        is64 = (isinstance(X, np.ndarray) and X.dtype == np.float64) or (
            isinstance(X, torch.Tensor) and X.dtype == torch.float64
        )
        dtype = torch.float64 if is64 else torch.float32
    Xt = as_unit_rows(X, dtype=dtype, device=device)
    lab = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    n = Xt.shape[0]
    if lab.shape[0] != n:
        raise ValueError(f"{lab.shape[0]} labels for {n} rows")
    uniq, inv = np.unique(lab, return_inverse=True)
    k = len(uniq)
    if not 2 <= k <= n - 1:
        raise ValueError(
            f"silhouette needs 2 <= number of clusters <= n_samples - 1, got {k} clusters for {n} samples"
        )
    return Xt, torch.from_numpy(inv.astype(np.int64)).to(Xt.device), k, uniq


def _cluster_sums(Xt: torch.Tensor, inv: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    sums = torch.zeros(k, Xt.shape[1], dtype=torch.float64, device=Xt.device)
    for start in range(0, Xt.shape[0], chunk):
        sums.index_add_(0, inv[start : start + chunk], Xt[start : start + chunk].double())
    return sums


def _samples(X, labels, chunk_size, dtype, device):
    Xt, inv, k, uniq = _prepare(X, labels, dtype, device)
    n = Xt.shape[0]
    chunk = chunk_size or max(1024, block_elements(Xt.device, _BLOCK_ELEMENTS) // max(k, 1))
    sums = _cluster_sums(Xt, inv, k, chunk if Xt.is_cuda else min(chunk, 16384))
    sizes = torch.bincount(inv, minlength=k).to(torch.float64)
    St = sums.to(Xt.dtype).t().contiguous()
    out = torch.empty(n, dtype=torch.float64, device=Xt.device)
    ar = torch.arange(min(chunk, n), device=Xt.device)
    for start in range(0, n, chunk):
        xc = Xt[start : start + chunk]
        lab = inv[start : start + chunk]
        m = xc.shape[0]
        dist_sum = sizes - torch.mm(xc, St).double()  # [m, K]: Σ_{j∈C} (1 − x·x_j), self included
        own_n = sizes[lab]
        self_sq = (xc * xc).sum(1).double()
        # Remove the own point's term (1 − x·x): 0 for unit rows, 1 for a zero row.
        own_sum = dist_sum[ar[:m], lab] - (1.0 - self_sq)
        a = own_sum / (own_n - 1).clamp_min(1)
        mean_d = dist_sum / sizes
        mean_d[ar[:m], lab] = float("inf")
        b = mean_d.min(dim=1).values
        a = a.clamp_min(0)
        b = b.clamp_min(0)
        denom = torch.maximum(a, b)
        s = torch.where(denom > 0, (b - a) / torch.where(denom > 0, denom, torch.ones_like(denom)), 0.0)
        s = torch.where(own_n > 1, s, torch.zeros_like(s))
        out[start : start + m] = s
    return out.cpu().numpy(), inv.cpu().numpy(), k, uniq


def cosine_silhouette_samples(
    X, labels, *, chunk_size: int | None = None, dtype=None, device=None
) -> np.ndarray:
    """Per-sample cosine silhouette (float64 [N]); see the module docstring."""
    return _samples(X, labels, chunk_size, dtype, device)[0]


def cosine_silhouette(X, labels, *, chunk_size: int | None = None, dtype=None, device=None) -> float:
    """Mean cosine silhouette, exact (equals sklearn's ``silhouette_score(..., metric="cosine")``).

    Raises ``ValueError`` for fewer than 2 clusters or at least as many clusters as samples.
    """
    return float(_samples(X, labels, chunk_size, dtype, device)[0].mean())


def cosine_silhouette_clusters(X, labels, *, chunk_size: int | None = None, dtype=None, device=None) -> dict:
    """``{"score", "labels" (sorted unique), "cluster_means", "sizes"}`` from one pass."""
    s, inv, k, uniq = _samples(X, labels, chunk_size, dtype, device)
    sizes = np.bincount(inv, minlength=k)
    means = np.bincount(inv, weights=s, minlength=k) / np.maximum(sizes, 1)
    return {"score": float(s.mean()), "labels": uniq, "cluster_means": means, "sizes": sizes}


def silhouette_cluster_means(samples: np.ndarray, labels) -> dict:
    """Mean per-sample silhouette for each label: ``{label: mean}``."""
    lab = np.asarray(labels)
    uniq, inv = np.unique(lab, return_inverse=True)
    means = np.bincount(inv, weights=samples, minlength=len(uniq)) / np.bincount(inv, minlength=len(uniq))
    return {u.item() if hasattr(u, "item") else u: float(m) for u, m in zip(uniq, means)}
