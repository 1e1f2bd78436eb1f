"""Per-sample quality scorers, all oriented "higher = keep", and their AUC against known clean/bad labels.

The score stage stores four raw columns per sample (router data): the trained quality gate (``quality``),
the base model's mean token NLL of the response (``response_nll``) and of the whole sample
(``sample_nll``), and optionally IFD (``ifd``). Selection ranks by one scorer:

| scorer | value (higher = better) | why |
|---|---|---|
| ``gate`` | ``quality`` | the seed's method: mean gate ``g`` of the warmed-up selector |
| ``response_nll`` | ``-response_nll`` | a perplexity filter on the answer: corrupted answers are surprising |
| ``sample_nll`` | ``-sample_nll`` | the same over prompt + answer (a clean prompt dilutes a bad answer) |
| ``ifd`` | ``-ifd`` | Cherry's IFD = L(A|Q)/L(A); a question that does not help predict its answer (IFD ≈ 1 or more) marks a mismatched pair. Needs ``score.ifd=true`` |
| ``gate_ppl_rank`` | mean of the normalised ranks of ``gate`` and ``response_nll`` | a documented combination: equal say to the gate and the perplexity, scale-free |
| ``nll_ifd_min`` | the lower of the normalised ranks of ``response_nll`` and ``ifd`` | a sample is as good as its worse view: perplexity catches garbled answers, IFD answers that do not fit their question (``score.ifd=true``) |

A missing value (NaN: no response token inside the window, IFD not computed) ranks last, never dropped.

``groups`` (``select.rank_within=dataset``: each row's ``dataset``) turns every value into its percentile
among the rows of its own group (``(rank - 0.5) / n``; a one-row group sits at the median). Why: sources
differ in how predictable a good answer is (an arithmetic answer's numbers are harder to predict than a
capital's name), so one pool-wide perplexity scale ranks whole sources below the bad rows of easier ones
and a quality floor cuts skills, not bad rows; against its own source a bad row still stands out (demo
figures in ``docs/benchmarks.md``).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

SCORERS = (
    "gate", "response_nll", "sample_nll", "ifd", "rep_ratio", "char_rep_ratio", "copy_ratio",
    "answer_tokens", "gate_ppl_rank", "nll_ifd_min", "nll_ifd_text",
)  # fmt: skip
# combinations: name -> (scorers combined, how)
_COMBINED = {
    "gate_ppl_rank": (("gate", "response_nll"), "mean"),
    "nll_ifd_min": (("response_nll", "ifd"), "min"),
    "nll_ifd_text": (("response_nll", "ifd"), "min"),  # + TEXT_FLAGS
}
_COLUMN = {
    "gate": "quality", "response_nll": "response_nll", "sample_nll": "sample_nll", "ifd": "ifd",
    "rep_ratio": "rep_ratio", "char_rep_ratio": "char_rep_ratio", "copy_ratio": "copy_ratio",
    "answer_tokens": "answer_tokens",
}  # fmt: skip
_SIGN = {
    "gate": 1.0, "response_nll": -1.0, "sample_nll": -1.0, "ifd": -1.0, "rep_ratio": -1.0,
    "char_rep_ratio": -1.0, "copy_ratio": -1.0, "answer_tokens": 1.0,
}  # fmt: skip
# nll_ifd_text: a row whose answer text signal is above its threshold is flagged and ranks below every
# unflagged row (so under any quality floor), whatever its perplexity says (benchmarks.md, real_model.py)
TEXT_FLAGS = {"rep_ratio": 0.5, "char_rep_ratio": 0.5, "copy_ratio": 0.6}


def text_flags(columns) -> np.ndarray:
    """bool ``[N]``: rows whose answer repeats itself or copies the prompt (:data:`TEXT_FLAGS`); a column
    the router data lacks (NaN) flags nothing."""
    get = columns.get if isinstance(columns, Mapping) else lambda k: getattr(columns, k, None)
    flags = None
    for col, limit in TEXT_FLAGS.items():
        values = get(col)
        if values is None:
            continue
        hit = np.nan_to_num(np.asarray(values, np.float64), nan=0.0) > limit
        flags = hit if flags is None else flags | hit
    return flags if flags is not None else np.zeros(len(get("response_nll")), bool)


def check_scorer(name: str) -> str:
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; expected one of {list(SCORERS)}")
    return name


def _worst_for_nan(values: np.ndarray) -> np.ndarray:
    finite = np.isfinite(values)
    floor = values[finite].min() - 1.0 if finite.any() else 0.0
    return np.where(finite, values, floor)


def _norm_rank(values: np.ndarray) -> np.ndarray:
    return rankdata(_worst_for_nan(values)) / max(len(values), 1)


def _group_rank(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Each value's percentile among the values of its own group, ``(rank - 0.5) / n`` in ``(0, 1)``: a
    group of one row sits at the median (0.5), so a tiny source gets no free pass over the quality floor."""
    _, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse, kind="stable")  # rows grouped: one O(N log N) pass, not one mask per group
    starts = np.r_[0, np.flatnonzero(np.diff(inverse[order])) + 1, len(order)]
    out = np.empty(len(values), np.float64)
    for lo, hi in itertools.pairwise(starts):
        rows = order[lo:hi]
        out[rows] = (rankdata(values[rows]) - 0.5) / (hi - lo)
    return out


def scorer_values(
    columns: Mapping[str, np.ndarray], name: str, *, groups: Sequence[str] | None = None
) -> np.ndarray:
    """float64 ``[N]``, higher = better, NaN -> below every finite value. ``columns``: the router-data
    columns ``quality``, ``response_nll``, ``sample_nll``, ``ifd`` (a :class:`RouterData` works too).
    With ``groups`` (one label per row), every value is its percentile within its group."""
    check_scorer(name)
    get = columns.get if isinstance(columns, Mapping) else lambda k: getattr(columns, k)
    if name in _COMBINED:
        parts, how = _COMBINED[name]
        if groups is None:
            ranks = np.stack([_norm_rank(scorer_values(columns, p)) for p in parts])
        else:
            ranks = np.stack([scorer_values(columns, p, groups=groups) for p in parts])
        combined = ranks.mean(axis=0) if how == "mean" else ranks.min(axis=0)
        if name == "nll_ifd_text":
            combined = combined - text_flags(columns).astype(np.float64)  # flagged: below every other row
        return combined
    values = _worst_for_nan(_SIGN[name] * np.asarray(get(_COLUMN[name]), np.float64))
    if groups is None:
        return values
    groups = np.asarray(groups)  # strings, or dictionary codes (select passes the dataset codes)
    if len(groups) != len(values):
        raise ValueError(f"{len(groups)} groups for {len(values)} rows")
    return _group_rank(values, groups)


def rank_groups(columns, rank_within: str) -> list[str] | np.ndarray | None:
    """The ``groups`` of :func:`scorer_values` for ``select.rank_within``: each row's ``dataset``, or None."""
    if rank_within == "pool":
        return None
    if rank_within == "dataset":
        groups = columns.datasets if hasattr(columns, "datasets") else columns["dataset"]
        return groups if isinstance(groups, np.ndarray) else list(groups)
    raise ValueError(f"select.rank_within must be dataset | pool, got {rank_within!r}")


def available_scorers(columns: Mapping[str, np.ndarray]) -> list[str]:
    """Scorers with at least one finite raw value (``ifd`` only when the score stage computed it)."""
    get = columns.get if isinstance(columns, Mapping) else lambda k: getattr(columns, k, None)
    have = {
        n
        for n, c in _COLUMN.items()
        if get(c) is not None and np.isfinite(np.asarray(get(c), np.float64)).any()
    }
    return [n for n in SCORERS if n in have or (n in _COMBINED and set(_COMBINED[n][0]) <= have)]


def scorer_aucs(
    columns: Mapping[str, np.ndarray],
    kinds: Sequence[str],
    *,
    clean: str = "clean",
    groups: Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    """``{scorer: {"overall": AUC, <kind>: AUC, ...}}``: ROC AUC (sklearn) of each scorer separating the
    ``clean`` rows (positives) from all bad rows, and from each bad kind alone. 0.5 = no signal.
    ``groups``: rank within them, as :func:`scorer_values` (so the AUC is that of the ranking select uses)."""
    kinds = np.asarray(kinds, dtype=object)
    is_clean = kinds == clean
    bad_kinds = sorted({str(k) for k in kinds[~is_clean]})
    out: dict[str, dict[str, float]] = {}
    if not is_clean.any() or not bad_kinds:
        return out
    for name in available_scorers(columns):
        values = scorer_values(columns, name, groups=groups)
        row = {"overall": float(roc_auc_score(is_clean, values))}
        for kind in bad_kinds:
            sel = is_clean | (kinds == kind)
            row[kind] = float(roc_auc_score(is_clean[sel], values[sel]))
        out[name] = row
    return out


__all__ = [
    "SCORERS",
    "TEXT_FLAGS",
    "available_scorers",
    "check_scorer",
    "rank_groups",
    "scorer_aucs",
    "scorer_values",
    "text_flags",
]
