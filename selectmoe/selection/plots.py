"""Selection plots (matplotlib Agg): k sweep curves, cluster sizes, score histogram selected vs pool.

The ``*_figure`` functions draw; the select stage saves them as PNGs and the run report embeds the same
figures (``selectmoe.report``), so each plot is drawn in one place."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    pyplot().close(fig)
    return path


def k_sweep_figure(
    ks: Sequence[int], inertia: Sequence[float], silhouette: Sequence, chosen_k: int, rule: str
):
    plt = pyplot()
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
    return fig


def cluster_sizes_figure(sizes: Sequence[int], mean_quality: Sequence[float | None]):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(range(len(sizes)), sizes, color="#66ccee")
    ax.set_xlabel("cluster")
    ax.set_ylabel("samples")
    ax2 = ax.twinx()
    ax2.plot(range(len(mean_quality)), [np.nan if m is None else m for m in mean_quality], "k.")
    ax2.set_ylabel("mean quality")
    ax.set_title("Cluster sizes and mean quality")
    return fig


def score_hist_figure(pool_scores: np.ndarray, selected_scores: np.ndarray):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    lo, hi = float(np.min(pool_scores)), float(np.max(pool_scores))
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 41)
    ax.hist(pool_scores, bins=bins, density=True, alpha=0.5, label=f"pool (n={len(pool_scores)})")
    ax.hist(selected_scores, bins=bins, density=True, alpha=0.6, label=f"selected (n={len(selected_scores)})")
    ax.set_xlabel("quality score")
    ax.set_ylabel("density")
    ax.legend()
    ax.set_title("Quality score: selected vs pool")
    return fig


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
        sweep = k_sweep_figure(curves["k"], curves["inertia"], curves["silhouette"], chosen_k, rule)
        paths.append(_save(sweep, d / "k_sweep.png"))
    paths.append(_save(cluster_sizes_figure(sizes, mean_quality), d / "cluster_sizes.png"))
    hist = score_hist_figure(np.asarray(pool_scores), np.asarray(selected_scores))
    paths.append(_save(hist, d / "score_hist.png"))
    return paths
