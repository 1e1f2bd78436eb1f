"""The paired bootstrap of a per-question difference (selectmoe.evaluation.paired)."""

from __future__ import annotations

import numpy as np
import pytest

from selectmoe.evaluation.paired import paired_difference, paired_verdict


def test_identical_arms_give_a_zero_interval() -> None:
    x = [1, 0, 1, 1, 0] * 20
    d = paired_difference([x], [x])
    assert (d.mean, d.low, d.high, d.n) == (0.0, 0.0, 0.0, 100)
    assert not d.helped and not d.hurt


def test_interval_matches_the_normal_approximation() -> None:
    # a wins 30 of 100 questions, ties the rest: mean 0.3, SE sqrt(0.21 / 100) = 0.0458
    a, b = [1] * 30 + [0] * 70, [0] * 100
    d = paired_difference([a], [b], n_boot=20_000)
    assert d.mean == pytest.approx(0.3)
    assert d.low == pytest.approx(0.3 - 1.96 * 0.0458, abs=0.012)
    assert d.high == pytest.approx(0.3 + 1.96 * 0.0458, abs=0.012)
    assert d.helped


def test_pooled_over_seeds_weights_questions_and_keeps_seed_means() -> None:
    # seed 0: 200 questions, a - b = +0.1; seed 1: 100 questions, a - b = -0.2
    a0, b0 = [1] * 20 + [0] * 180, [0] * 200
    a1, b1 = [0] * 100, [1] * 20 + [0] * 80
    d = paired_difference([a0, a1], [b0, b1], seed=3)
    assert d.n == 300 and d.n_seeds == 2
    assert d.seed_means == pytest.approx((0.1, -0.2))
    assert d.mean == pytest.approx((20 - 20) / 300)
    assert d.low < 0 < d.high
    # the same inputs and seed give the same interval
    again = paired_difference([a0, a1], [b0, b1], seed=3)
    assert (again.low, again.high) == (d.low, d.high)


def test_pairing_removes_the_shared_question_noise() -> None:
    # both arms right on the same easy questions; a right on 40 more of 1,000: an unpaired comparison of
    # two accuracies (0.54 vs 0.50, SE ~0.022 each) cannot tell them apart, the paired one can
    rng = np.random.default_rng(0)
    b = (rng.random(1000) < 0.5).astype(int)
    a = b.copy()
    a[np.flatnonzero(b == 0)[:40]] = 1
    d = paired_difference([a], [b])
    assert d.mean == pytest.approx(0.04)
    assert d.low > 0.02
    assert "beat" in paired_verdict(d, "selected", "random")


def test_mismatched_questions_are_an_error() -> None:
    with pytest.raises(ValueError, match=r"seed 0 has .* same questions"):
        paired_difference([[1, 0, 1]], [[1, 0]])
    with pytest.raises(ValueError, match="2 seeds for a but 1 for b"):
        paired_difference([[1], [0]], [[1]])
    with pytest.raises(ValueError, match="no questions"):
        paired_difference([[]], [[]])


def test_verdict_words() -> None:
    d = paired_difference([[0] * 50 + [1] * 10], [[1] * 50 + [0] * 10])
    text = paired_verdict(d, "selected", "random")
    assert text.startswith("selected - random = -0.667 (paired 95% interval")
    assert "did worse than random" in text
    tie = paired_difference([[1, 0] * 20], [[0, 1] * 20])
    assert "no evidence" in paired_verdict(tie, "selected", "top-k")
