import numpy as np
import pytest
import torch

from selectmoe.cluster.kmeans import assign_to_centroids, spherical_kmeans
from selectmoe.cluster.kselect import choose_k, elbow_k
from selectmoe.cluster.registry import get_clusterer, register_clusterer


def blobs(n=600, d=16, k=4, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(k, d))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    lab = rng.integers(0, k, n)
    return c[lab] + spread * rng.normal(size=(n, d)) / np.sqrt(d), lab


def _recomputed_inertia(X, res):
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    return float((1.0 - (Xn * res.centroids[res.labels]).sum(1)).sum())


def test_deterministic_and_inertia_exact():
    X, _ = blobs()
    a = spherical_kmeans(X, 4, n_init=2, seed=7)
    b = spherical_kmeans(torch.from_numpy(X * 3.0), 4, n_init=2, seed=7)  # scale-free, torch input
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.centroids, b.centroids, atol=1e-6)
    assert a.inertia == pytest.approx(_recomputed_inertia(X, a), rel=1e-5)
    np.testing.assert_allclose(np.linalg.norm(a.centroids, axis=1), 1.0, atol=1e-5)
    # labels are the nearest centroid of the returned centroids
    lab, inertia = assign_to_centroids(X, a.centroids)
    np.testing.assert_array_equal(lab, a.labels)
    assert inertia == pytest.approx(a.inertia, rel=1e-5)


def test_recovers_blobs():
    X, truth = blobs(spread=0.2)
    res = spherical_kmeans(X, 4, n_init=3, seed=0)
    # every found cluster is one true cluster
    for c in range(4):
        assert len(set(truth[res.labels == c])) == 1


def test_restarts_differ_and_best_wins():
    X, _ = blobs(n=400, k=12, spread=1.5, seed=2)
    res = spherical_kmeans(X, 12, n_init=4, seed=0, max_iter=5)
    assert len(set(res.inertias)) > 1  # distinct generators -> distinct restarts
    assert res.inertia == min(res.inertias)
    assert res.restart == int(np.argmin(res.inertias))
    single = spherical_kmeans(X, 12, n_init=1, seed=res.restart, max_iter=5)
    assert single.inertia == pytest.approx(res.inertia)
    other = spherical_kmeans(X, 12, n_init=1, seed=1, max_iter=5)
    assert not np.array_equal(other.labels, spherical_kmeans(X, 12, seed=0, max_iter=5).labels)


def test_empty_clusters_reseeded():
    # 3 distinct directions, many duplicates, k = 5: every cluster must stay non-empty when possible.
    base = np.eye(6)[:5]
    X = np.repeat(base, [50, 50, 50, 1, 1], axis=0)
    res = spherical_kmeans(X, 5, seed=0)
    assert sorted(np.bincount(res.labels, minlength=5)) == [1, 1, 50, 50, 50]
    assert res.inertia == pytest.approx(0.0, abs=1e-5)


def test_bad_k():
    with pytest.raises(ValueError):
        spherical_kmeans(np.ones((3, 2)), 4)


def test_elbow_hand_made():
    ks = [2, 3, 4, 5, 6, 7]
    inertia = [100.0, 80.0, 60.0, 20.0, 18.0, 16.0]
    # normalised y = [1, .762, .524, .048, .024, 0]; d2 centred on k=3..6 = [0, -.238, .452, 0] -> k=5
    k, why = elbow_k(ks, inertia)
    assert k == 5 and "k=5" in why
    assert choose_k(ks, inertia, None, "elbow")[0] == 5
    assert choose_k(ks, inertia, [0.1, 0.2, 0.5, 0.4, float("nan"), 0.3], "silhouette")[0] == 4
    assert choose_k(ks, inertia, None, "kneedle")[0] in (4, 5)
    with pytest.raises(ValueError):
        choose_k(ks, inertia, None, "bogus")


def test_registry():
    assert get_clusterer("spherical_kmeans") is spherical_kmeans
    register_clusterer("mine", spherical_kmeans)
    assert get_clusterer("mine") is spherical_kmeans
    with pytest.raises(ValueError, match="unknown"):
        get_clusterer("nope")


def test_incremental_cluster_sums_match_full_recomputation():
    """The CPU Lloyd loop updates sums from the rows that moved; they must equal a fresh index_add_."""
    from selectmoe.cluster.kmeans import _cluster_sums

    gen = torch.Generator().manual_seed(0)
    X = torch.randn(5000, 32, generator=gen)
    labels = torch.randint(0, 7, (5000,), generator=gen)
    sums = _cluster_sums(X, labels, 7, None)
    for _ in range(6):  # a few updates, each moving ~10% of the rows, one cluster emptied
        new = labels.clone()
        moved = torch.rand(5000, generator=gen) < 0.1
        new[moved] = torch.randint(0, 7, (int(moved.sum()),), generator=gen)
        new[new == 3] = 4
        sums = _cluster_sums(X, new, 7, (labels, sums))
        labels = new
    full = torch.zeros(7, 32).index_add_(0, labels, X)
    assert torch.allclose(sums, full, atol=1e-3), (sums - full).abs().max()
    assert float(sums[3].abs().max()) < 1e-3  # the emptied cluster's sum returns to ~0


def test_lockstep_fit_is_the_solo_fit_of_every_k():
    """Fitting many k in lockstep (one pass over X per iteration for all of them) returns, for each k, the
    bits a solo fit returns: on both sides of the fused-GEMM threshold, with runs stopping at different
    iterations (fixed point, tol, and max_iter)."""
    from selectmoe.cluster.kmeans import _FUSE_MIN_K, spherical_kmeans_many

    X, _ = blobs(n=3000, d=48, k=20, spread=1.0, seed=5)
    ks = [3, _FUSE_MIN_K - 1, _FUSE_MIN_K, 17, 29]
    iters: dict[int, set[int]] = {}
    for max_iter in (4, 300):
        many = spherical_kmeans_many(X, ks, n_init=2, seed=11, max_iter=max_iter)
        assert list(many) == ks
        for k in ks:
            solo = spherical_kmeans(X, k, n_init=2, seed=11, max_iter=max_iter)
            np.testing.assert_array_equal(many[k].labels, solo.labels)
            np.testing.assert_array_equal(many[k].centroids, solo.centroids)
            assert (many[k].inertias, many[k].n_iter, many[k].restart) == (
                solo.inertias,
                solo.n_iter,
                solo.restart,
            )
            iters.setdefault(max_iter, set()).add(many[k].n_iter)
    assert iters[4] == {4}  # every run cut at max_iter (then assigned once more)
    assert len(iters[300]) > 1  # runs stopped at different iterations: the active set shrank


def test_fused_gemm_columns_are_the_solo_gemm():
    """The property the lockstep relies on (selectmoe.cluster.kmeans._FUSE_MIN_K): from that many output
    columns on, a column of a wider GEMM is the same bits as a GEMM of its block alone, whatever its
    position. Guards a torch/MKL upgrade."""
    from selectmoe.cluster.kmeans import _FUSE_MIN_K

    gen = torch.Generator().manual_seed(0)
    X = torch.nn.functional.normalize(torch.rand(2000, 1024, generator=gen), dim=1)
    blocks = [
        torch.nn.functional.normalize(torch.rand(k, 1024, generator=gen), dim=1)
        for k in (_FUSE_MIN_K, 40, 13, 100)
    ]
    wide = torch.mm(X, torch.cat(blocks).t().contiguous())
    offset = 0
    for C in blocks:
        assert torch.equal(wide[:, offset : offset + len(C)], torch.mm(X, C.t().contiguous()))
        offset += len(C)


def test_fit_many_without_a_batched_form_fits_one_k_after_another():
    from selectmoe.cluster.registry import fit_many

    X, _ = blobs(n=300)

    def mine(X, k, **params):
        return spherical_kmeans(X, k, **params)

    got = fit_many(mine, X, [3, 2], n_init=1, max_iter=50, tol=1e-4, seed=0, device=None)
    assert list(got) == [3, 2]
    np.testing.assert_array_equal(got[2].labels, spherical_kmeans(X, 2, seed=0, max_iter=50).labels)
