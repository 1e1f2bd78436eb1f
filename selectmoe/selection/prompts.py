"""One answer per question: of the pool rows that ask the same thing, only the best-scored may be selected.

Why: two different answers to one question teach the finetune two targets for one input, and at most one of
them is right. A wrong answer alone can look as likely as a right one to a scorer that does not know the
fact (on the demo, arithmetic's wrong results: AUC 0.54 against the whole pool); beside the right answer to
the same question, the scorer ranks it lower 92% of the time (docs/benchmarks.md, "One answer per
question"). Exact repeats of a question add nothing to the selection's diversity either.

Rows share a question when their ``prompt_key`` (router data; :func:`selectmoe.data.records.prompt_key`:
the system and user turns) is equal; a row without a key (no question) is always kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from selectmoe.selection.policies import id_ranks


@dataclass(frozen=True)
class AnswerPerPrompt:
    """The rows kept (sorted indices) and what the rule did, for ``selection.json``."""

    kept: np.ndarray
    left_out: int
    shared_prompts: int  # questions asked by more than one row

    def counts(self) -> dict[str, int]:
        """Flat, for select's counts (selection.json, the manifest, the report's table)."""
        return {"answers_left_out": self.left_out, "shared_prompts": self.shared_prompts}


def one_answer_per_prompt(
    keys: pa.Array, scores: np.ndarray, ids: pa.Array | np.ndarray | None = None
) -> AnswerPerPrompt:
    """Every row without a key, and of each key's rows the best by ``scores`` (ties by id ascending, as
    every policy breaks them; a NaN score loses). ``keys``: int64, null = no question; ``ids``: strings or
    their ranks (:func:`~selectmoe.selection.policies.id_ranks`)."""
    n = len(keys)
    if len(scores) != n:
        raise ValueError(f"{len(scores)} scores for {n} prompt keys")
    valid = keys.is_valid().to_numpy(zero_copy_only=False)
    values = keys.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    rank = id_ranks(ids)
    tie = np.arange(n) if rank is None else rank
    rows = np.flatnonzero(valid)
    score = -np.asarray(scores, dtype=np.float64)[rows]  # lexsort puts NaN after +inf: a NaN score loses
    order = rows[np.lexsort((tie[rows], score, values[rows]))]
    grouped = values[order]
    first = np.r_[True, grouped[1:] != grouped[:-1]] if len(order) else np.zeros(0, bool)
    keep = ~valid
    keep[order[first]] = True
    group_sizes = np.diff(np.r_[np.flatnonzero(first), len(order)])
    return AnswerPerPrompt(
        kept=np.flatnonzero(keep).astype(np.int64),
        left_out=int(n - keep.sum()),
        shared_prompts=int((group_sizes > 1).sum()),
    )
