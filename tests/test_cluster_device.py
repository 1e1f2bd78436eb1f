"""Clustering inputs without double copies, chunk sizes by device (issue 22, item 7)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from selectmoe.cluster.kmeans import as_unit_rows, block_elements, spherical_kmeans
from selectmoe.cluster.silhouette import cosine_silhouette


def _old_unit_rows(X: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.array(X, dtype=np.float32))
    norms = torch.linalg.vector_norm(t, dim=1, keepdim=True)
    return t / torch.where(norms > 0, norms, torch.ones_like(norms))


def _features(tmp_path, n=4000, d=64) -> np.ndarray:
    """A read-only float16 memory map (how router features arrive), one zero row."""
    rng = np.random.default_rng(0)
    data = rng.normal(size=(n, d)).astype(np.float16)
    data[7] = 0
    path = tmp_path / "x.npy"
    np.save(path, data)
    return np.load(path, mmap_mode="r")


def test_numpy_input_is_copied_once_straight_into_the_tensor(tmp_path):
    """A read-only fp16 map becomes unit fp32 rows with no converted numpy copy on the way (old main: a full
    ``np.array`` fp32 copy, then a second tensor for the division); values equal the old formula bit for
    bit."""
    X = _features(tmp_path)
    tracemalloc.start()
    try:
        t = as_unit_rows(X)
        _, peak = tracemalloc.get_traced_memory()  # numpy allocations only (torch's are not traced)
    finally:
        tracemalloc.stop()
    assert peak < X.shape[0] * X.shape[1] * 4 // 10
    assert t.dtype == torch.float32 and torch.equal(t, _old_unit_rows(X))
    assert bool((t[7] == 0).all())


def test_prepared_rows_are_reused_not_copied(tmp_path):
    """Unit rows already in the dtype and on the device come back as they are: the sweep prepares X once
    for k-means, the assignment and the silhouette of every k. Results are those of the numpy input."""
    X = _features(tmp_path)
    t = as_unit_rows(X)
    assert as_unit_rows(t) is t
    raw = torch.from_numpy(np.asarray(X, dtype=np.float32))  # not unit: a normalised copy, input untouched
    before = raw.clone()
    assert torch.equal(as_unit_rows(raw), t) and torch.equal(raw, before)
    a, b = spherical_kmeans(t, 5, seed=0), spherical_kmeans(X, 5, seed=0)
    assert np.array_equal(a.labels, b.labels) and a.inertia == b.inertia
    assert cosine_silhouette(t, a.labels) == cosine_silhouette(X, a.labels)


def test_chunk_sizes_follow_the_device():
    from selectmoe.cluster import silhouette

    assert block_elements("cpu") == 1 << 19 and block_elements(None) == 1 << 19  # cache-sized on CPU
    assert block_elements("cuda") == 1 << 26 and block_elements(torch.device("cuda", 0)) == 1 << 26
    assert block_elements("cuda", silhouette._BLOCK_ELEMENTS) == 1 << 25


@pytest.mark.gpu
def test_cuda_kmeans_matches_cpu_labels():
    """GPU: the same clustering as on CPU (well-separated blobs), data uploaded once."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 32))
    X = (centres[rng.integers(0, 6, 20000)] + 0.05 * rng.normal(size=(20000, 32))).astype(np.float32)
    t = as_unit_rows(X, device="cuda")
    assert as_unit_rows(t, device="cuda") is t
    gpu = spherical_kmeans(t, 6, seed=0, device="cuda")
    cpu = spherical_kmeans(X, 6, seed=0)
    assert gpu.inertia == pytest.approx(cpu.inertia, rel=1e-4)
