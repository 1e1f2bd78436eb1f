"""Clusterer registry: ``cfg.method`` names a function ``fn(X, k, *, n_init, max_iter, tol, seed, device)``
returning an object with ``.labels`` (int [N]), ``.centroids`` ([K, D]) and ``.inertia``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from selectmoe.cluster.kmeans import spherical_kmeans

Clusterer = Callable[..., Any]
_REGISTRY: dict[str, Clusterer] = {"spherical_kmeans": spherical_kmeans}


def register_clusterer(name: str, fn: Clusterer, *, overwrite: bool = False) -> None:
    if not callable(fn):
        raise TypeError(f"clusterer {name!r} is not callable")
    if name in _REGISTRY and not overwrite and _REGISTRY[name] is not fn:
        raise ValueError(f"clusterer {name!r} is already registered (pass overwrite=True)")
    _REGISTRY[name] = fn


def get_clusterer(name: str) -> Clusterer:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown clustering method {name!r}; registered: {sorted(_REGISTRY)}") from None


def list_clusterers() -> list[str]:
    return sorted(_REGISTRY)
