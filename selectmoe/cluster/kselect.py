"""Choosing k from a sweep's inertia / silhouette curves."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

K_RULES = ("elbow", "kneedle", "silhouette")


def elbow_k(k_values: Sequence[int], inertia: Sequence[float]) -> tuple[int, str]:
    """The original elbow rule: argmax of the second difference of the min-max-normalised inertia.

    ``d2 = np.diff(y, 2)`` has ``d2[i] = y[i] − 2·y[i+1] + y[i+2]``, centred on point ``i+1``; the chosen k
    is therefore ``k_values[argmax(d2) + 1]`` (first maximum on ties). With < 3 points there is no second
    difference and the smallest k is returned.
    """
    ks = [int(k) for k in k_values]
    y = np.asarray(inertia, dtype=np.float64)
    if len(ks) < 3:
        return ks[0], f"elbow: fewer than 3 k values, took the smallest k={ks[0]}"
    span = float(y.max() - y.min())
    y = (y - y.min()) / span if span > 0 else np.zeros_like(y)
    d2 = np.diff(y, 2)
    i = int(np.argmax(d2))
    return ks[i + 1], f"elbow: max second difference {d2[i]:.4g} of normalised inertia at k={ks[i + 1]}"


def kneedle_k(k_values: Sequence[int], inertia: Sequence[float]) -> tuple[int, str]:
    """Kneedle (convex, decreasing) via ``kneed`` (refused at config load when it is not installed)."""
    try:
        from kneed import KneeLocator
    except ImportError as e:
        raise ValueError("k_choice=kneedle needs the kneed package (pip install kneed)") from e
    ks = [int(k) for k in k_values]
    if len(ks) >= 3:
        knee = KneeLocator(ks, list(map(float, inertia)), curve="convex", direction="decreasing").knee
        if knee is not None:
            return int(knee), f"kneedle: knee of the inertia curve at k={int(knee)}"
    k, why = elbow_k(k_values, inertia)
    return k, f"kneedle found no knee, {why}"


def silhouette_k(k_values: Sequence[int], silhouette: Sequence[float]) -> tuple[int, str]:
    """argmax silhouette (NaN ignored; first maximum on ties)."""
    ks = [int(k) for k in k_values]
    s = np.array([np.nan if v is None else float(v) for v in silhouette], dtype=np.float64)
    if np.all(np.isnan(s)):
        raise ValueError("silhouette rule: no finite silhouette in the sweep")
    i = int(np.nanargmax(s))
    return ks[i], f"silhouette: max silhouette {s[i]:.4f} at k={ks[i]}"


def choose_k(
    k_values: Sequence[int], inertia: Sequence[float], silhouette: Sequence[float] | None, rule: str
) -> tuple[int, str]:
    """(k, reason) for ``rule`` in ``elbow | kneedle | silhouette``."""
    if len(k_values) == 0:
        raise ValueError("choose_k: empty sweep")
    if len(k_values) != len(inertia):
        raise ValueError("choose_k: k_values and inertia differ in length")
    if rule == "elbow":
        return elbow_k(k_values, inertia)
    if rule == "kneedle":
        return kneedle_k(k_values, inertia)
    if rule == "silhouette":
        if silhouette is None:
            raise ValueError("silhouette rule needs silhouette values")
        return silhouette_k(k_values, silhouette)
    raise ValueError(f"unknown k_choice {rule!r}; expected one of {K_RULES}")


def finite_or_none(v: float | None) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
