import numpy as np
import pytest
import torch
from sklearn.metrics import silhouette_samples, silhouette_score

from selectmoe.cluster.silhouette import (
    cosine_silhouette,
    cosine_silhouette_clusters,
    cosine_silhouette_samples,
    silhouette_cluster_means,
)


def _data(n=240, d=12, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d))


@pytest.mark.parametrize("case", range(6))
def test_matches_sklearn(case):
    rng = np.random.default_rng(100 + case)
    X = _data(seed=case)
    k = [2, 3, 5, 8, 13, 40][case]
    labels = rng.integers(0, k, len(X))
    if case >= 2:
        labels[:3] = [1000, 1001, 1002]  # singletons
    if case >= 3:
        X[10] = 0.0  # zero rows
        X[11] = 0.0
    if case == 5:
        X[20] = X[21]  # duplicate rows
    ref = silhouette_score(X, labels, metric="cosine")
    assert abs(cosine_silhouette(X, labels) - ref) <= 1e-6
    ref_s = silhouette_samples(X, labels, metric="cosine")
    np.testing.assert_allclose(cosine_silhouette_samples(X, labels), ref_s, atol=1e-6)
    # chunking and torch input give the same value
    assert abs(cosine_silhouette(torch.from_numpy(X), labels, chunk_size=7) - ref) <= 1e-6


def test_float32_path_close():
    X = _data(seed=9).astype(np.float32)
    labels = np.random.default_rng(9).integers(0, 4, len(X))
    ref = silhouette_score(X.astype(np.float64), labels, metric="cosine")
    assert abs(cosine_silhouette(X, labels) - ref) < 1e-5


def test_singleton_and_per_cluster_means():
    X = _data(n=30, seed=3)
    labels = np.array([0] * 14 + [1] * 15 + [2])
    s = cosine_silhouette_samples(X, labels)
    assert s[-1] == 0.0
    out = cosine_silhouette_clusters(X, labels)
    np.testing.assert_allclose(out["cluster_means"], [s[:14].mean(), s[14:29].mean(), 0.0])
    assert out["sizes"].tolist() == [14, 15, 1]
    assert silhouette_cluster_means(s, labels)[2] == 0.0
    assert out["score"] == pytest.approx(s.mean())


def test_errors():
    X = _data(n=10)
    with pytest.raises(ValueError, match="number of clusters"):
        cosine_silhouette(X, np.zeros(10, int))
    with pytest.raises(ValueError, match="number of clusters"):
        cosine_silhouette(X, np.arange(10))
    with pytest.raises(ValueError, match="labels for"):
        cosine_silhouette(X, np.zeros(9, int))
