"""Cheap text signals of a sample's answer, from the tokens the score stage already encodes.

Why: a pretrained model finds a copied prompt or a repeated sentence *easy* to predict, so perplexity and
IFD both rank such degenerate answers near the top (the known failure of perplexity filters; issue 26
measures it on Gemma-3-270M). The data-cleaning field catches them with plain counts (Data-Juicer's word-
and character-repetition filters, n-gram overlap with the prompt). Per row, float32 (router-data
:data:`selectmoe.router_data.TEXT_COLUMNS`):

| column | value |
|---|---|
| ``rep_ratio`` | Data-Juicer's word-repetition ratio over the answer's *tokens*: the share of its token ``N``-grams (``N`` = :data:`TOKEN_NGRAM`) that occur more than once, every occurrence counted; 0 for an answer shorter than ``N`` |
| ``char_rep_ratio`` | Data-Juicer's character-repetition ratio of the answer text (``rep_len`` = :data:`CHAR_NGRAM`): the share of all character ``n``-grams taken by the ``sqrt(#distinct)`` most frequent repeated ones |
| ``copy_ratio`` | the share of the answer's token ``N``-grams that also occur among the rest of the sample's tokens (the prompt, template tags included); an answer of 4 to ``N - 1`` tokens is one gram (1 when it occurs whole in the prompt), a shorter one 0 |
| ``answer_tokens`` | answer (assistant) tokens inside the window (EOS left out, as for the ratios) |

The answer is the tokens the response labels mark (every assistant turn; ``label_mode=assistant_only`` on
the same text) and their text. How selection uses them: :mod:`selectmoe.selection.scorers`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from selectmoe.data.encoding import IGNORE_INDEX

TOKEN_NGRAM = 8  # tokens per n-gram (about Data-Juicer's 10 words at ~1.3 tokens a word, for short answers)
CHAR_NGRAM = 10  # Data-Juicer's character_repetition_filter default rep_len
MIN_COPY_TOKENS = 4  # a shorter answer is never called a copy


def _ngram_keys(tokens: np.ndarray, n: int) -> np.ndarray:
    """One uint64 key per ``n``-gram (a polynomial hash; collisions are negligible at 64 bits)."""
    t = tokens.astype(np.uint64)
    keys = np.zeros(len(t) - n + 1, np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            keys = keys * np.uint64(1_000_003) + t[j : len(t) - n + 1 + j] + np.uint64(1)
    return keys


def token_rep_ratio(answer: np.ndarray, n: int = TOKEN_NGRAM) -> float:
    if len(answer) < n:
        return 0.0
    _, counts = np.unique(_ngram_keys(answer, n), return_counts=True)
    return float(counts[counts > 1].sum() / counts.sum())


def copy_ratio(answer: np.ndarray, prompt: np.ndarray, n: int = TOKEN_NGRAM) -> float:
    """Share of the answer's ``n``-grams found in the prompt; an answer of ``MIN_COPY_TOKENS``..``n-1``
    tokens counts as one gram (is it, whole, inside the prompt? a short prompt copied verbatim), a shorter
    one never (a one-word answer that names an option of its question is no copy)."""
    n = min(n, len(answer))
    if n < MIN_COPY_TOKENS or len(prompt) < n:
        return 0.0
    return float(np.isin(_ngram_keys(answer, n), _ngram_keys(prompt, n)).mean())


def char_rep_ratio(text: str, n: int = CHAR_NGRAM) -> float:
    """Data-Juicer's ``character_repetition_filter`` statistic."""
    grams = Counter(text[i : i + n] for i in range(len(text) - n + 1))
    if not grams:
        return 0.0
    freqs = sorted(grams.values(), reverse=True)
    no_rep = sum(1 for f in freqs if f == 1)
    top = min(int(np.sqrt(len(freqs))), len(freqs) - no_rep)
    total = sum(freqs)
    return float(sum(freqs[:top]) / total) if total else 0.0


def text_signals(
    input_ids: Sequence[Sequence[int]],
    response_labels: Sequence[Sequence[int]],
    answers: Sequence[str],
    *,
    eos_id: int | None = None,
) -> dict[str, np.ndarray]:
    """float32 ``[B]`` per :data:`selectmoe.router_data.TEXT_COLUMNS` for a batch of encoded rows
    (``answers``: each row's assistant text, turns joined by a newline). ``eos_id``: the EOS token that
    closes every assistant turn is left out of the answer's tokens (it is never in the prompt, so it would
    hide a short copied prompt)."""
    out = {k: np.zeros(len(answers), np.float32) for k in ("rep_ratio", "char_rep_ratio", "copy_ratio")}
    out["answer_tokens"] = np.zeros(len(answers), np.float32)
    for i, (ids, labels, text) in enumerate(zip(input_ids, response_labels, answers)):
        ids = np.asarray(ids, np.int64)
        is_answer = np.asarray(labels, np.int64) != IGNORE_INDEX
        answer, prompt = ids[is_answer], ids[~is_answer]
        if eos_id is not None:
            answer = answer[answer != eos_id]
        out["rep_ratio"][i] = token_rep_ratio(answer)
        out["copy_ratio"][i] = copy_ratio(answer, prompt)
        out["char_rep_ratio"][i] = char_rep_ratio(text)
        out["answer_tokens"][i] = float(len(answer))
    return out


__all__ = [
    "CHAR_NGRAM",
    "MIN_COPY_TOKENS",
    "TOKEN_NGRAM",
    "char_rep_ratio",
    "copy_ratio",
    "text_signals",
    "token_rep_ratio",
]
