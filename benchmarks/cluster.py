"""Clustering benchmarks: exact cosine silhouette vs sklearn, spherical k-means vs faiss, a small k sweep.

    python benchmarks/cluster.py [--threads 2] [--sweep-n 20000] [--skip-sklearn] [--skip-faiss]

The issue-3 sweep target (k in [10, 100] on N=100k with the select stage's defaults), Ray only:

    python benchmarks/cluster.py --skip-sklearn --skip-faiss --big-n 1000 --km-n 1000 \
        --sweep-n 100000 --sweep-k 10 100 --sweep-n-init 3 --sweep-max-iter 300 --sweep-ray-only

Synthetic clustered data: normalised Gaussian blobs around random unit centres. Prints one table.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from selectmoe.cluster.kmeans import spherical_kmeans
from selectmoe.cluster.silhouette import cosine_silhouette
from selectmoe.cluster.sweep import sweep_k


def blobs(n: int, d: int, k: int, *, spread: float = 0.6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, k, n)
    X = centres[labels] + spread * rng.normal(size=(n, d)) / np.sqrt(d)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X.astype(np.float32), labels


def _time(fn, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sil-n", type=int, default=12_000)
    p.add_argument("--big-n", type=int, default=400_000)
    p.add_argument("--km-n", type=int, default=100_000)
    p.add_argument("--sweep-n", type=int, default=20_000)
    p.add_argument("--sweep-k", type=int, nargs=2, default=[2, 12])
    p.add_argument("--skip-sklearn", action="store_true")
    p.add_argument("--skip-faiss", action="store_true")
    p.add_argument("--sweep-n-init", type=int, default=1)
    p.add_argument("--sweep-max-iter", type=int, default=50)
    p.add_argument("--sweep-ray-only", action="store_true", help="skip the in-process sweep (label check)")
    p.add_argument("--skip-sweep", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[tuple[str, str, str]] = []

    # 1. silhouette vs sklearn (N=12k, D=256, K=50)
    X, lab = blobs(args.sil_n, 256, 50, seed=1)
    t_ours, s_ours = _time(lambda: cosine_silhouette(X, lab), repeat=3)
    t_ours64, s_ours64 = _time(lambda: cosine_silhouette(X.astype(np.float64), lab), repeat=3)
    rows.append(("silhouette N=12k D=256 K=50 ours fp32", f"{t_ours * 1e3:.1f} ms", f"s={s_ours:.6f}"))
    rows.append(("silhouette N=12k ours fp64", f"{t_ours64 * 1e3:.1f} ms", f"s={s_ours64:.6f}"))
    if not args.skip_sklearn:
        from sklearn.metrics import silhouette_score

        t_sk, s_sk = _time(lambda: silhouette_score(X.astype(np.float64), lab, metric="cosine"))
        rows.append(("silhouette N=12k sklearn (fp64)", f"{t_sk * 1e3:.1f} ms", f"s={s_sk:.6f}"))
        rows.append(
            ("  speed-up sklearn/ours fp32", f"{t_sk / t_ours:.0f}x", f"|diff|={abs(s_sk - s_ours):.2e}")
        )
        rows.append(
            ("  speed-up sklearn/ours fp64", f"{t_sk / t_ours64:.0f}x", f"|diff|={abs(s_sk - s_ours64):.2e}")
        )
    del X

    # 2. silhouette at N=400k, D=256, K=64
    X, lab = blobs(args.big_n, 256, 64, seed=2)
    t_big, s_big = _time(lambda: cosine_silhouette(X, lab))
    rows.append((f"silhouette N={args.big_n // 1000}k D=256 K=64 fp32", f"{t_big:.2f} s", f"s={s_big:.6f}"))
    del X

    # 3. k-means vs faiss (N=100k, D=256, K=64, 20 iterations)
    n, d, k, iters = args.km_n, 256, 64, 20
    X, _ = blobs(n, d, k, seed=3)
    t_km, res = _time(lambda: spherical_kmeans(X, k, n_init=1, max_iter=iters, tol=0.0, seed=1))
    rows.append(
        (
            f"spherical_kmeans N={n // 1000}k K={k} {res.n_iter} it",
            f"{t_km / max(res.n_iter, 1) * 1e3:.1f} ms/it (total {t_km:.2f} s)",
            f"inertia={res.inertia:.2f}",
        )
    )
    if not args.skip_faiss:
        import faiss

        faiss.omp_set_num_threads(args.threads)
        km = faiss.Kmeans(d, k, niter=iters, spherical=True, seed=1, max_points_per_centroid=n, verbose=False)
        t_f, _ = _time(lambda: km.train(X))
        _, idx = km.index.search(X, 1)
        C = km.centroids / np.linalg.norm(km.centroids, axis=1, keepdims=True)
        f_inertia = float((1.0 - (X * C[idx[:, 0]]).sum(1).astype(np.float64)).sum())
        rows.append(
            (
                f"faiss.Kmeans spherical {iters} it",
                f"{t_f / iters * 1e3:.1f} ms/it (total {t_f:.2f} s)",
                f"inertia={f_inertia:.2f}",
            )
        )
        rows.append(
            (
                "  ours/faiss",
                f"time/it {t_km / max(res.n_iter, 1) / (t_f / iters):.2f}x",
                f"inertia {res.inertia / f_inertia:.4f}x",
            )
        )
    del X

    # 4. small k sweep (in-process and on Ray)
    if not args.skip_sweep:
        X, _ = blobs(args.sweep_n, 256, 8, seed=4)
        ks = list(range(args.sweep_k[0], args.sweep_k[1] + 1))
        fit = dict(n_init=args.sweep_n_init, max_iter=args.sweep_max_iter)
        label = (
            f"k sweep N={args.sweep_n} k={ks[0]}..{ks[-1]} n_init={fit['n_init']} max_iter={fit['max_iter']}"
        )
        sw = None
        if not args.sweep_ray_only:
            t_loc, sw = _time(lambda: sweep_k(X, ks, **fit, use_ray=False))
            best_k = sw.ks[int(np.nanargmax(sw.silhouette))]
            rows.append((f"{label} in-process", f"{t_loc:.2f} s", f"best silhouette k={best_k}"))
        import ray

        ray.init(address="local", num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
        t_ray, sw2 = _time(lambda: sweep_k(X, ks, **fit, num_actors=args.threads))
        ray.shutdown()
        if sw is not None:
            check = f"labels identical={all(np.array_equal(sw.labels[k_], sw2.labels[k_]) for k_ in ks)}"
        else:
            curves = np.isfinite(sw2.inertia).sum(), np.isfinite(sw2.silhouette).sum()
            check = f"curves complete: {curves[0]}/{len(ks)} inertia, {curves[1]}/{len(ks)} silhouette"
        check += f", mean iterations {np.mean(sw2.n_iter):.0f}"
        rows.append((f"{label} on Ray ({args.threads} actors)", f"{t_ray:.2f} s", check))

    w = [max(len(r[i]) for r in rows) for i in range(3)]
    print(f"torch {torch.__version__}, threads={args.threads}")
    for r in rows:
        print("  ".join(c.ljust(wi) for c, wi in zip(r, w)))


if __name__ == "__main__":
    main()
