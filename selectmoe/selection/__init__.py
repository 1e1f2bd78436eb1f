"""Selection: policies over clusters, the streaming pool join/writer, plots."""

from selectmoe.selection.policies import (
    POLICIES,
    budget_for,
    get_policy,
    proportional,
    proportional_quotas,
    random_policy,
    round_robin,
    select_indices,
    top_k,
)
from selectmoe.selection.writer import fetch_messages, write_selection_jsonl

__all__ = [
    "POLICIES",
    "budget_for",
    "fetch_messages",
    "get_policy",
    "proportional",
    "proportional_quotas",
    "random_policy",
    "round_robin",
    "select_indices",
    "top_k",
    "write_selection_jsonl",
]
