"""Paired comparison of two finetune arms on the same questions: the per-question difference a - b,
bootstrapped over questions and pooled over seeds.

Why paired: two arms scored on the same questions share the questions' difficulty, so the question-level
noise (a 210-question accuracy has a standard error of ~0.03) cancels in the difference; what is left is
where the two models disagree. Why pooled over seeds with the resampling *within* each seed: a seed may
rebuild the questions themselves (the demo's eval set is generated from the run's seed), so question ``i``
of one seed is not question ``i`` of another; each seed keeps its own question count in every resample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

_CHUNK = 500


@dataclass(frozen=True)
class PairedDifference:
    """``mean`` of the per-question difference ``a - b`` over all seeds' questions, its bootstrap
    ``low``/``high`` interval at ``level``, the question count ``n`` and the per-seed means."""

    mean: float
    low: float
    high: float
    level: float
    n: int
    seed_means: tuple[float, ...]

    @property
    def n_seeds(self) -> int:
        return len(self.seed_means)

    @property
    def helped(self) -> bool:
        """True when the whole interval is above 0."""
        return self.low > 0

    @property
    def hurt(self) -> bool:
        """True when the whole interval is below 0."""
        return self.high < 0

    def as_dict(self) -> dict:
        return asdict(self)


def paired_difference(
    a: Sequence[Sequence[float]],
    b: Sequence[Sequence[float]],
    *,
    n_boot: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """Paired bootstrap of ``mean(a - b)``: ``a[s][i]`` and ``b[s][i]`` are two arms' scores (e.g. 0/1
    correct) on question ``i`` of seed ``s``. Resamples questions with replacement within each seed,
    ``n_boot`` times (seeded: the same inputs give the same interval), and takes the percentile interval.

    Raises ``ValueError`` when the seed counts differ, a seed's two arms have different question counts
    (they were not scored on the same questions), or there are no questions."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference: {len(a)} seeds for a but {len(b)} for b")
    diffs = []
    for s, (xa, xb) in enumerate(zip(a, b, strict=True)):
        xa, xb = np.asarray(xa, dtype=np.float64), np.asarray(xb, dtype=np.float64)
        if xa.shape != xb.shape or xa.ndim != 1:
            raise ValueError(
                f"paired_difference: seed {s} has {xa.shape} scores for a but {xb.shape} for b "
                "(both arms must be scored on the same questions)"
            )
        if xa.size:
            diffs.append(xa - xb)
    n = sum(d.size for d in diffs)
    if n == 0:
        raise ValueError("paired_difference: no questions")
    if not 0 < level < 1:
        raise ValueError(f"paired_difference: level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    totals = np.zeros(n_boot)
    for d in diffs:  # sum of resampled differences per seed, then divided by the pooled count
        for start in range(0, n_boot, _CHUNK):  # bounded memory: _CHUNK x questions indices at a time
            rows = min(_CHUNK, n_boot - start)
            totals[start : start + rows] = totals[start : start + rows] + d[
                rng.integers(0, d.size, size=(rows, d.size))
            ].sum(axis=1)
    boots = totals / n
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(boots, [tail, 100 - tail])
    return PairedDifference(
        mean=float(np.concatenate(diffs).mean()),
        low=float(low),
        high=float(high),
        level=level,
        n=n,
        seed_means=tuple(float(d.mean()) for d in diffs),
    )


def paired_verdict(diff: PairedDifference, a: str, b: str) -> str:
    """One sentence: ``a - b`` with its interval, and in words whether ``a`` beat ``b`` beyond noise."""
    seeds = f"{diff.n_seeds} seeds" if diff.n_seeds > 1 else "1 seed"
    figure = (
        f"{a} - {b} = {diff.mean:+.3f} (paired {diff.level:.0%} interval {diff.low:+.3f} to {diff.high:+.3f}, "
        f"{diff.n:,} questions, {seeds})"
    )
    if diff.helped:
        words = f"{a} beat {b}: the whole interval is above 0"
    elif diff.hurt:
        words = f"{a} did worse than {b}: the whole interval is below 0"
    else:
        words = f"no evidence that {a} differs from {b}: the interval includes 0"
    return f"{figure}: {words}."


__all__ = ["PairedDifference", "paired_difference", "paired_verdict"]
