"""Clusterer registry: ``cfg.method`` names a function ``fn(X, k, *, n_init, max_iter, tol, seed, device)``
returning an object with ``.labels`` (int [N]), ``.centroids`` ([K, D]) and ``.inertia``. A clusterer may
also register a batched form ``many(X, ks, **same) -> {k: result}`` that fits several k at once (the k
sweep hands each actor a group of k); without one the group is fitted one k after another."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from selectmoe.cluster.kmeans import spherical_kmeans, spherical_kmeans_many

Clusterer = Callable[..., Any]
_REGISTRY: dict[str, Clusterer] = {"spherical_kmeans": spherical_kmeans}
_BATCHED: dict[Clusterer, Callable[..., dict[int, Any]]] = {spherical_kmeans: spherical_kmeans_many}


def register_clusterer(
    name: str, fn: Clusterer, *, many: Callable[..., dict[int, Any]] | None = None, overwrite: bool = False
) -> None:
    if not callable(fn):
        raise TypeError(f"clusterer {name!r} is not callable")
    if name in _REGISTRY and not overwrite and _REGISTRY[name] is not fn:
        raise ValueError(f"clusterer {name!r} is already registered (pass overwrite=True)")
    _REGISTRY[name] = fn
    if many is not None:
        _BATCHED[fn] = many


def fit_many(clusterer: Clusterer, X, ks, **params) -> dict[int, Any]:
    """``{k: clusterer(X, k, **params)}`` for every k in ``ks``, by the clusterer's batched form if it has one."""
    many = _BATCHED.get(clusterer)
    if many is not None:
        return many(X, ks, **params)
    return {int(k): clusterer(X, int(k), **params) for k in ks}


def get_clusterer(name: str) -> Clusterer:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown clustering method {name!r}; registered: {sorted(_REGISTRY)}") from None


def list_clusterers() -> list[str]:
    return sorted(_REGISTRY)
