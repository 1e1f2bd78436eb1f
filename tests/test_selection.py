import numpy as np
import pytest

from selectmoe.cluster.sweep import k_values, sweep_k
from selectmoe.selection.policies import (
    budget_for,
    proportional,
    proportional_quotas,
    random_policy,
    round_robin,
    select_indices,
    top_k,
)

IDS = list("abcdefgh")
SCORES = np.array([0.9, 0.5, 0.7, 0.7, 0.8, 0.1, 0.95, 0.3])
LABELS = np.array([1, 0, 0, 0, 1, 2, 2, 1])
PINNED_QUALITY_SAMPLE = [2, 4, 6]  # seed 0: c, e, g (cluster 0, 1, 2; numpy default_rng)


def test_round_robin_exact():
    # cluster 0: c(2), d(3) (tie 0.7, id asc), b(1); cluster 1: a(0), e(4), h(7); cluster 2: g(6), f(5)
    assert round_robin(SCORES, LABELS, 5, ids=IDS).tolist() == [2, 0, 6, 3, 4]
    assert round_robin(SCORES, LABELS, 8, ids=IDS).tolist() == [2, 0, 6, 3, 4, 5, 1, 7]
    # tie broken by id: swap ids of c and d -> d's row first
    ids2 = list("abdcefgh")
    assert round_robin(SCORES, LABELS, 1, ids=ids2).tolist() == [3]


def test_top_k_and_random():
    assert top_k(SCORES, LABELS, 3, ids=IDS).tolist() == [6, 0, 4]
    assert top_k(SCORES, None, 5, ids=IDS).tolist() == [6, 0, 4, 2, 3]
    r = random_policy(SCORES, LABELS, 4, seed=3)
    assert r.tolist() == np.random.default_rng(3).permutation(8)[:4].tolist()
    assert r.tolist() == random_policy(SCORES, LABELS, 4, seed=3).tolist()
    assert len(set(r.tolist())) == 4


def test_proportional_exact():
    # weights size x mean: 3*.6333=1.9, 3*.6667=2.0, 2*.525=1.05 -> exact quotas 1.54, 1.62, 0.85
    # floors [1, 1, 0], two leftovers by largest remainder -> cluster 2 (.85) and cluster 1 (.62)
    assert proportional(SCORES, LABELS, 4, ids=IDS).tolist() == [2, 0, 4, 6]


def test_proportional_quotas_cap_and_redistribute():
    assert proportional_quotas(np.array([1, 10]), np.array([100.0, 1.0]), 5).tolist() == [1, 4]
    assert proportional_quotas(np.array([3, 3]), np.array([0.0, 0.0]), 4).sum() == 4
    assert proportional_quotas(np.array([2, 2]), np.array([1.0, 1.0]), 10).tolist() == [2, 2]


def test_budget():
    assert budget_for(8, 0.5) == 4
    assert budget_for(10, 0.01) == 1
    assert budget_for(120, 0.1) == 12
    with pytest.raises(ValueError):
        budget_for(10, 0.0)
    idx, budget = select_indices("top_k", SCORES, LABELS, 0.25, ids=IDS)
    assert budget == 2 and idx.tolist() == [6, 0]
    with pytest.raises(ValueError, match="unknown selection policy"):
        select_indices("nope", SCORES, LABELS, 0.25)


def test_k_values():
    assert k_values([3, 6]) == [3, 4, 5, 6]
    assert k_values([4]) == [4]
    with pytest.raises(ValueError):
        k_values([5, 2])


def _blobs(n=300, d=8, k=3, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(k, d))
    X = c[rng.integers(0, k, n)] + 0.2 * rng.normal(size=(n, d))
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)


def test_sweep_on_ray(ray_local):
    X = _blobs()
    res = sweep_k(X, range(2, 7), n_init=2, seed=1, num_actors=2)
    assert res.ks == [2, 3, 4, 5, 6]
    assert len(res.inertia) == len(res.silhouette) == 5 and all(np.isfinite(res.silhouette))
    assert res.inertia[0] > res.inertia[-1]
    for k in res.ks:
        assert res.labels[k].dtype == np.int32 and len(np.unique(res.labels[k])) == k
    local = sweep_k(X, range(2, 7), n_init=2, seed=1, use_ray=False)
    for k in res.ks:  # schedule-independent and identical to in-process
        np.testing.assert_array_equal(local.labels[k], res.labels[k])
    assert res.ks[int(np.argmax(res.silhouette))] == 3


def test_quality_round_robin_floor_then_clusters():
    from selectmoe.selection.policies import get_policy, quality_round_robin

    # floor 0.5 -> eligible top 4 by score: g(6) .95, a(0) .9, e(4) .8, c(2) .7 (tie with d: id asc)
    assert quality_round_robin(SCORES, LABELS, 4, ids=IDS).tolist() == [2, 0, 6, 4]
    # floor 0.25 -> only g and a are eligible: cluster 0 (c, 0.7) is left out, unlike plain round_robin
    assert quality_round_robin(SCORES, LABELS, 2, ids=IDS, quality_floor=0.25).tolist() == [0, 6]
    assert round_robin(SCORES, LABELS, 2, ids=IDS).tolist() == [2, 0]
    # the floor never starves the budget: at least `budget` rows are eligible
    assert quality_round_robin(SCORES, LABELS, 8, ids=IDS, quality_floor=0.1).tolist() == [
        2,
        0,
        6,
        3,
        4,
        5,
        1,
        7,
    ]
    bound = get_policy("quality_round_robin", quality_floor=0.25)
    assert bound(SCORES, LABELS, 2, ids=IDS).tolist() == [0, 6]
    with pytest.raises(ValueError, match="quality_floor"):
        quality_round_robin(SCORES, LABELS, 2, quality_floor=0.0)


def test_quality_sample_floor_then_a_seeded_sample_over_clusters():
    from selectmoe.selection.policies import get_policy, quality_sample

    # floor 0.5 -> eligible c(2), a(0), e(4), g(6); the sample spreads them over clusters 0, 1, 2
    picked = quality_sample(SCORES, LABELS, 3, ids=IDS, seed=0).tolist()
    assert sorted(LABELS[picked].tolist()) == [0, 1, 2] and set(picked) <= {0, 2, 4, 6}
    # inside the floor the order is the seeded sample, not the score: over seeds, cluster 1's pick is
    # sometimes e (0.8) although a (0.9) scores higher, and never a row below the floor
    firsts = {quality_sample(SCORES, LABELS, 3, ids=IDS, seed=s).tolist()[1] for s in range(20)}
    assert firsts == {0, 4}
    assert (
        quality_sample(SCORES, LABELS, 3, ids=IDS, seed=5).tolist()
        == quality_sample(SCORES, LABELS, 3, ids=IDS, seed=5).tolist()
    )
    assert quality_sample(SCORES, LABELS, 3, ids=IDS, seed=0).tolist() == PINNED_QUALITY_SAMPLE
    bound = get_policy("quality_sample", quality_floor=0.25)  # only g and a are eligible
    assert sorted(bound(SCORES, LABELS, 2, ids=IDS).tolist()) == [0, 6]
    with pytest.raises(ValueError, match="quality_floor"):
        quality_sample(SCORES, LABELS, 2, quality_floor=0.0)


def test_same_seed_same_selection_for_every_policy():
    from selectmoe.selection.policies import POLICIES

    rng = np.random.default_rng(5)
    scores, labels = rng.random(300), rng.integers(0, 7, 300)
    ids = [f"id{i:03d}" for i in rng.permutation(300)]
    for name, policy in POLICIES.items():
        a = policy(scores, labels, 40, ids=ids, seed=11)
        assert a.tolist() == policy(scores.copy(), labels.copy(), 40, ids=list(ids), seed=11).tolist(), name
        assert len(set(a.tolist())) == 40
    r = POLICIES["random"]
    assert r(scores, labels, 40, seed=11).tolist() != r(scores, labels, 40, seed=12).tolist()


def test_cluster_mix():
    from selectmoe.selection.policies import cluster_mix

    mix = cluster_mix(LABELS, [2, 0, 6, 4], 4)  # clusters 0,1,1,2 of the 3 non-empty ones (k=4)
    assert mix["clusters_covered"] == 3 and mix["clusters"] == 3 and mix["coverage"] == 1.0
    assert mix["entropy"] == pytest.approx(-(0.5 * np.log(0.5) + 2 * 0.25 * np.log(0.25)))
    assert mix["entropy_norm"] == pytest.approx(mix["entropy"] / np.log(3))
    one = cluster_mix(LABELS, [0, 4], 3)
    assert (one["clusters_covered"], one["coverage"], one["entropy"]) == (1, pytest.approx(1 / 3), 0.0)


def test_scorer_values_and_aucs_by_hand():
    from selectmoe.selection.scorers import available_scorers, scorer_aucs, scorer_values

    nan = np.nan
    cols = {
        "quality": np.array([0.9, 0.8, 0.85, 0.1, 0.95]),
        "response_nll": np.array([1.0, 2.0, 3.0, nan, 0.5]),
        "sample_nll": np.full(5, nan),
        "ifd": np.full(5, nan),
    }
    kinds = ["clean", "clean", "x", "x", "y"]
    assert available_scorers(cols) == ["gate", "response_nll", "gate_ppl_rank"]
    # NaN ranks last; lower NLL = better
    assert scorer_values(cols, "response_nll").tolist() == [-1.0, -2.0, -3.0, -4.0, -0.5]
    assert scorer_values(cols, "gate_ppl_rank").tolist() == pytest.approx([0.8, 0.5, 0.5, 0.2, 1.0])
    aucs = scorer_aucs(cols, kinds)
    assert aucs["gate"] == pytest.approx({"overall": 0.5, "x": 0.75, "y": 0.0})
    assert aucs["response_nll"] == pytest.approx({"overall": 4 / 6, "x": 1.0, "y": 0.0})
    assert aucs["gate_ppl_rank"] == pytest.approx({"overall": 3.5 / 6, "x": 0.875, "y": 0.0})
    with pytest.raises(ValueError, match="unknown scorer"):
        scorer_values(cols, "perplexity")
    # nll_ifd_min: the worse of the two ranks (IFD lower = better); needs ifd values
    cols["ifd"] = np.array([0.6, 0.9, 0.7, 1.2, 1.1])  # ranks of -ifd: [5, 3, 4, 1, 2] / 5
    assert scorer_values(cols, "nll_ifd_min").tolist() == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.4])
    assert "nll_ifd_min" in available_scorers(cols) and "ifd" in available_scorers(cols)
    # ranked within groups: each value is its percentile (rank - 0.5) / n among its own group's rows
    groups = ["a", "a", "b", "b", "b"]
    assert scorer_values(cols, "response_nll", groups=groups).tolist() == pytest.approx(
        [0.75, 0.25, 1.5 / 3, 0.5 / 3, 2.5 / 3]
    )
    # a combination takes each part's within-group percentile: -ifd gives [.75, .25 | 2.5/3, .5/3, 1.5/3]
    assert scorer_values(cols, "nll_ifd_min", groups=groups).tolist() == pytest.approx(
        [0.75, 0.25, 1.5 / 3, 0.5 / 3, 1.5 / 3]
    )
    # a one-row group sits at the median, not at the top
    assert scorer_values(cols, "gate", groups=["a", "a", "a", "a", "solo"])[4] == 0.5
    assert scorer_aucs(cols, kinds, groups=groups)["response_nll"] == pytest.approx(
        {"overall": 3 / 6, "x": 0.75, "y": 0.0}
    )
    with pytest.raises(ValueError, match="4 groups for 5 rows"):
        scorer_values(cols, "gate", groups=groups[:4])
