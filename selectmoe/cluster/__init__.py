"""Cosine clustering for selection: spherical k-means, exact O(N·K·D) silhouette, k choice, Ray k sweep."""

from selectmoe.cluster.kmeans import (
    KMeansResult,
    assign_to_centroids,
    spherical_kmeans,
    spherical_kmeans_many,
)
from selectmoe.cluster.kselect import K_RULES, choose_k, elbow_k
from selectmoe.cluster.registry import fit_many, get_clusterer, list_clusterers, register_clusterer
from selectmoe.cluster.silhouette import (
    cosine_silhouette,
    cosine_silhouette_clusters,
    cosine_silhouette_samples,
    silhouette_cluster_means,
)
from selectmoe.cluster.sweep import KFit, SweepResult, fit_ks, k_groups, k_values, sweep_k

__all__ = [
    "K_RULES",
    "KFit",
    "KMeansResult",
    "SweepResult",
    "assign_to_centroids",
    "choose_k",
    "cosine_silhouette",
    "cosine_silhouette_clusters",
    "cosine_silhouette_samples",
    "elbow_k",
    "fit_ks",
    "fit_many",
    "get_clusterer",
    "k_groups",
    "k_values",
    "list_clusterers",
    "register_clusterer",
    "silhouette_cluster_means",
    "spherical_kmeans",
    "spherical_kmeans_many",
    "sweep_k",
]
