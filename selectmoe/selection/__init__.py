"""Selection: scorers, policies over clusters, the streaming pool join/writer, plots."""

from selectmoe.selection.policies import (
    POLICIES,
    budget_for,
    cluster_mix,
    get_policy,
    proportional,
    proportional_quotas,
    quality_round_robin,
    quality_sample,
    random_policy,
    round_robin,
    select_indices,
    top_k,
)
from selectmoe.selection.scorers import SCORERS, scorer_aucs, scorer_values
from selectmoe.selection.writer import fetch_messages, write_selection_jsonl

__all__ = [
    "POLICIES",
    "SCORERS",
    "budget_for",
    "cluster_mix",
    "fetch_messages",
    "get_policy",
    "proportional",
    "proportional_quotas",
    "quality_round_robin",
    "quality_sample",
    "random_policy",
    "round_robin",
    "scorer_aucs",
    "scorer_values",
    "select_indices",
    "top_k",
    "write_selection_jsonl",
]
