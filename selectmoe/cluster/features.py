"""Feature blocks -> unit rows: the one normalisation selection applies, to the fit sample and to every
row of the assignment pass alike.

``select.features`` picks the router-data columns (``routing``, ``hidden`` or both). One block: each row is
L2-normalised (float32). Several blocks: each block is L2-normalised on its own (so a 2,048-wide hidden
state does not drown 1,024 routing probabilities), the blocks are concatenated and the row renormalised.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from selectmoe.cluster.kmeans import UnitRows, as_unit_rows

FEATURE_MODES = ("auto", "routing", "hidden", "both")
_CHUNK = 65536


def resolve_features(mode: str, widths: Mapping[str, int]) -> list[str]:
    """The feature columns for ``select.features=mode`` given the columns the router data has."""
    if mode not in FEATURE_MODES:
        raise ValueError(f"select.features={mode!r}: expected one of {list(FEATURE_MODES)}")
    if mode == "auto":
        wanted = ["routing"] if "routing" in widths else ["hidden"]
    elif mode == "both":
        wanted = ["routing", "hidden"]
    else:
        wanted = [mode]
    missing = [c for c in wanted if c not in widths]
    if missing:
        raise ValueError(
            f"select.features={mode!r}: the router data has no {' or '.join(missing)} column "
            f"(it has: {sorted(widths) or 'no feature column'})"
        )
    return wanted


def _unit_numpy(block: np.ndarray) -> np.ndarray:
    """float16/32 [n, F] -> float32 L2-normalised rows, chunk by chunk (zero rows stay zero)."""
    out = np.empty(block.shape, dtype=np.float32)
    for s in range(0, block.shape[0], _CHUNK):
        b = np.asarray(block[s : s + _CHUNK], dtype=np.float32)
        norms = np.linalg.norm(b, axis=1, keepdims=True)
        out[s : s + _CHUNK] = b / np.where(norms > 0, norms, 1.0)
    return out


def unit_features(X: np.ndarray, widths: Sequence[int] | None = None, *, device=None) -> UnitRows:
    """``X`` ([n, sum(widths)], the blocks side by side) -> :class:`UnitRows` (float32 torch), made once
    per sweep actor and per assignment block."""
    widths = list(widths or [X.shape[1]])
    if sum(widths) != X.shape[1]:
        raise ValueError(f"feature blocks {widths} do not add up to {X.shape[1]} columns")
    if len(widths) == 1:
        x = _unit_numpy(X)
    else:
        edges = np.cumsum([0, *widths])
        x = np.concatenate([_unit_numpy(X[:, a:b]) for a, b in itertools.pairwise(edges)], axis=1)
    return UnitRows(as_unit_rows(x, device=device))


def assign_block(X: np.ndarray, widths: Sequence[int] | None, centroids: np.ndarray, *, device=None):
    """Nearest centroid (int32) and its cosine (float32) for every row of one feature block."""
    from selectmoe.cluster.kmeans import assign

    x = unit_features(X, widths, device=device).t
    C = as_unit_rows(np.asarray(centroids, np.float32), device=x.device)
    with torch.no_grad():
        labels, best = assign(x, C)
    return labels.cpu().numpy().astype(np.int32), best.cpu().numpy().astype(np.float32)
