"""Selection plots (matplotlib Agg): k sweep curves, cluster sizes, score histogram selected vs pool."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    _plt().close(fig)
    return path


def plot_k_sweep(
    path, ks: Sequence[int], inertia: Sequence[float], silhouette: Sequence, chosen_k: int, rule: str
):
    plt = _plt()
    fig, ax1 = plt.subplots(figsize=(7, 3.2))
    ax1.plot(ks, inertia, "o-", color="#4477aa", ms=3, label="inertia")
    ax1.set_xlabel("k")
    ax1.set_ylabel("inertia Σ(1−cos)", color="#4477aa")
    sil = [np.nan if v is None else v for v in silhouette]
    if len(sil) and not np.all(np.isnan(sil)):
        ax2 = ax1.twinx()
        ax2.plot(ks, sil, "s-", color="#ee6677", ms=3, label="silhouette")
        ax2.set_ylabel("silhouette (cosine)", color="#ee6677")
    ax1.axvline(chosen_k, color="k", ls="--", lw=1)
    ax1.set_title(f"k sweep: chosen k = {chosen_k} ({rule})")
    return _save(fig, Path(path))


def plot_cluster_sizes(path, sizes: Sequence[int], mean_quality: Sequence[float]):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(range(len(sizes)), sizes, color="#66ccee")
    ax.set_xlabel("cluster")
    ax.set_ylabel("samples")
    ax2 = ax.twinx()
    ax2.plot(range(len(mean_quality)), mean_quality, "k.")
    ax2.set_ylabel("mean quality")
    ax.set_title("Cluster sizes and mean quality")
    return _save(fig, Path(path))


def plot_score_hist(path, pool_scores: np.ndarray, selected_scores: np.ndarray):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    lo, hi = float(np.min(pool_scores)), float(np.max(pool_scores))
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 41)
    ax.hist(pool_scores, bins=bins, density=True, alpha=0.5, label=f"pool (n={len(pool_scores)})")
    ax.hist(selected_scores, bins=bins, density=True, alpha=0.6, label=f"selected (n={len(selected_scores)})")
    ax.set_xlabel("quality score")
    ax.set_ylabel("density")
    ax.legend()
    ax.set_title("Quality score: selected vs pool")
    return _save(fig, Path(path))


def write_plots(
    out_dir: str | os.PathLike,
    *,
    curves: dict,
    chosen_k: int,
    rule: str,
    sizes,
    mean_quality,
    pool_scores,
    selected_scores,
) -> list[Path]:
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    if len(curves.get("k", [])) > 1:
        paths.append(
            plot_k_sweep(
                d / "k_sweep.png", curves["k"], curves["inertia"], curves["silhouette"], chosen_k, rule
            )
        )
    paths.append(plot_cluster_sizes(d / "cluster_sizes.png", sizes, mean_quality))
    paths.append(plot_score_hist(d / "score_hist.png", np.asarray(pool_scores), np.asarray(selected_scores)))
    return paths
