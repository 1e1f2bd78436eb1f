"""One answer per question (select.one_answer_per_prompt): the prompt key, the rule's values, and select
with it, every policy but random among the kept rows."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pool_shards import write_pool_shard

from selectmoe.config import SelectConfig
from selectmoe.data.records import prompt_key
from selectmoe.router_data import PROMPT_KEY, RouterDataWriter
from selectmoe.selection.policies import floor_rows
from selectmoe.selection.prompts import one_answer_per_prompt
from selectmoe.stages.select import apply_policy, run_select
from selectmoe.stages.select_targets import TargetSimilarity

SYSTEM = {"role": "system", "content": "Be brief."}
ASK = {"role": "user", "content": "What is 2 + 3?"}


def _chat(*turns: dict, answer: str = "5") -> list[dict]:
    return [*turns, {"role": "assistant", "content": answer}]


def test_prompt_key_is_the_question_side_only():
    right, wrong = _chat(SYSTEM, ASK), _chat(SYSTEM, ASK, answer="6")
    assert prompt_key(right) == prompt_key(wrong) == -8475319065287033780  # blake2b-8, little-endian
    assert prompt_key(_chat(ASK)) != prompt_key(right)  # another system turn: another context
    assert prompt_key(_chat({"role": "user", "content": "What is 2 + 4?"})) != prompt_key(_chat(ASK))
    # the turns' order and every user turn count; the assistant turns between them do not
    two = [ASK, {"role": "assistant", "content": "5"}, {"role": "user", "content": "Why?"}]
    assert prompt_key(_chat(*two)) == prompt_key(_chat(ASK, {"role": "user", "content": "Why?"}))
    assert prompt_key(_chat({"role": "user", "content": "Why?"}, ASK)) != prompt_key(_chat(*two))
    assert prompt_key([{"role": "assistant", "content": "hi"}]) is None  # no question to share


# 8 rows: key 5 asked by rows 0, 1, 4 (row 4 best); key 7 by rows 3, 5 tied (ids decide: "a" < "c");
# key 9 by row 6 alone; rows 2 and 7 have no key (always kept)
KEYS = pa.array([5, 5, None, 7, 5, 7, 9, None], pa.int64())
SCORES = np.array([0.4, 0.6, 0.1, 0.5, 0.9, 0.5, np.nan, 0.2])
IDS = ["h", "g", "f", "c", "e", "a", "b", "d"]


def test_one_answer_per_prompt_keeps_each_questions_best_row():
    got = one_answer_per_prompt(KEYS, SCORES, IDS)
    assert got.kept.tolist() == [2, 4, 5, 6, 7]
    assert got.counts() == {"answers_left_out": 3, "shared_prompts": 2}
    # a NaN score loses to any number; without ids, ties go to the lower row
    scores = SCORES.copy()
    scores[4] = np.nan
    assert one_answer_per_prompt(KEYS, scores).kept.tolist() == [1, 2, 3, 6, 7]
    with pytest.raises(ValueError, match="7 scores for 8 prompt keys"):
        one_answer_per_prompt(KEYS, SCORES[:7])


def test_the_floor_policies_keep_the_pools_floor_and_keys_so_the_rule_only_takes_rows_out():
    rank = np.array([7, 6, 5, 2, 4, 0, 1, 3])  # the ranks of IDS
    kept = one_answer_per_prompt(KEYS, SCORES, IDS).kept  # [2, 4, 5, 6, 7]
    # the pool's floor (best 4 of 8: rows 4, 1, 5, 3), the candidates inside it, then the next best candidate
    assert floor_rows(SCORES, rank, 2, 0.5).tolist() == [1, 3, 4, 5]
    assert floor_rows(SCORES, rank, 2, 0.5, kept).tolist() == [4, 5]
    assert floor_rows(SCORES, rank, 3, 0.5, kept).tolist() == [4, 5, 7]
    one_cluster = np.zeros(8, dtype=np.int64)
    common = dict(ranks=rank, quality_floor=1.0)
    for seed in range(5):
        # one key per pool row: with the rule, the sample is the one without it, less the rows left out
        every = apply_policy("quality_sample", SCORES, one_cluster, 8, seed=seed, **common)
        got = apply_policy("quality_sample", SCORES, one_cluster, 3, seed=seed, rows=kept, **common)
        assert got.tolist() == [r for r in every.tolist() if r in kept][:3]
        # a target whose neighbourhood is every row: targeted is the default, with the rule as without it
        near = TargetSimilarity("routing", None, np.linspace(0.1, 0.8, 8)[:, None], np.array([0.0]), 0.0)
        labels = np.array([0, 1, 0, 1, 0, 1, 0, 1])
        for rows in (None, kept):
            assert (
                apply_policy(
                    "targeted", SCORES, labels, 3, seed=seed, target=near, rows=rows, **common
                ).tolist()
                == apply_policy("quality_sample", SCORES, labels, 3, seed=seed, rows=rows, **common).tolist()
            )
    # every floor policy takes the pool's floor less the rows left out (over the kept rows alone, the floor
    # would be 3 rows and row 7 could be taken)
    for policy in ("quality_sample", "quality_round_robin", "targeted", "rds"):
        for seed in range(5):
            got = apply_policy(policy, SCORES, labels, 2, ranks=rank, seed=seed, quality_floor=0.5, target=near,
                               rows=kept)  # fmt: skip
            assert sorted(got.tolist()) == [4, 5], (policy, seed)
    assert apply_policy("top_k", SCORES, one_cluster, 2, seed=3, rows=kept, **common).tolist() == [4, 5]
    # random: the reference of no selection samples the whole pool, whatever the rows
    assert (
        apply_policy("random", SCORES, one_cluster, 8, seed=3, rows=kept, **common).tolist()
        == np.random.default_rng(3).permutation(8).tolist()
    )
    with pytest.raises(ValueError, match="needs the target similarity"):
        apply_policy("rds", SCORES, one_cluster, 3, seed=3, **common)


# ------------------------------------------------------------------------------------------ select
def _twins(tmp_path, *, keys: bool = True):
    """24 questions asked twice (a right and a worse-scored wrong answer) and 12 once; one dataset."""
    rng = np.random.default_rng(0)
    ids, quality, key = [], [], []
    for q in range(36):
        for twin in range(2 if q < 24 else 1):
            ids.append(f"q{q:02d}-{twin}")
            quality.append(rng.uniform(0.5, 1.0) if twin == 0 else rng.uniform(0.0, 1.0))
            key.append(1000 + q)
    quality = np.asarray(quality, np.float32)
    order = rng.permutation(len(ids))  # twins apart in the shard
    ids, quality, key = [ids[i] for i in order], quality[order], [key[i] for i in order]
    router, pool = tmp_path / "router", tmp_path / "pool"
    (pool / "shards").mkdir(parents=True)
    w = RouterDataWriter(router, "part-00000", 2, 4)
    w.write_batch(
        {
            "id": ids,
            "dataset": ["ds"] * len(ids),
            "n_tokens": np.full(len(ids), 10),
            "truncated": np.zeros(len(ids), bool),
            "quality": quality,
            "quality_layers": np.repeat(quality[:, None], 2, 1),
            "routing": np.abs(rng.normal(size=(len(ids), 8))),
            **({PROMPT_KEY: key} if keys else {}),
        }
    )
    w.close()
    write_pool_shard(pool / "shards" / "part-00000.parquet", ids, dataset="ds", row_group_size=16)
    return router, pool, dict(zip(ids, quality.tolist()))


def _select(router, pool, out, **kw):
    cfg = dict(router_dir=str(router), pool_dir=str(pool), output_dir=str(out), selection_percentage=0.2,
               k=3, seed=0, plots=False, score="gate", rank_within="pool", quality_floor=0.5,
               baselines=["random", "top_k"])  # fmt: skip
    return run_select(SelectConfig(**{**cfg, **kw}))


def _ids(path):
    return [json.loads(x)["id"] for x in path.read_text().splitlines()]


def test_select_one_answer_per_prompt_end_to_end(tmp_path):
    router, pool, quality = _twins(tmp_path)
    off = _select(router, pool, tmp_path / "off")
    on = _select(router, pool, tmp_path / "on", one_answer_per_prompt=True)
    assert (off.budget, on.budget) == (12, 12)  # the budget is the pool's share, the rule or not
    best = {
        f"q{q:02d}": max((i for i in quality if i.startswith(f"q{q:02d}")), key=quality.get)
        for q in range(36)
    }
    for name in ("selected_data.jsonl", "selected_top_k.jsonl"):
        picked = _ids(tmp_path / "on" / name)
        assert len(picked) == 12 and all(best[i[:3]] == i for i in picked), name
    # without the rule the default and top-k take worse answers of a twin: the rule changes something
    assert any(best[i[:3]] != i for i in _ids(tmp_path / "off" / "selected_top_k.jsonl"))
    assert _ids(tmp_path / "on" / "selected_random.jsonl") == _ids(tmp_path / "off" / "selected_random.jsonl")
    info = json.loads((tmp_path / "on" / "selection.json").read_text())
    counts = {"pool": 60, "selected": 12, "budget": 12}
    assert info["counts"] == {**counts, "answers_left_out": 24, "shared_prompts": 24}
    assert json.loads((tmp_path / "off" / "selection.json").read_text())["counts"] == counts


def test_a_budget_above_the_distinct_questions_takes_them_all_and_says_so(tmp_path, caplog):
    router, pool, _ = _twins(tmp_path)
    res = _select(router, pool, tmp_path / "o", one_answer_per_prompt=True, selection_percentage=0.8)
    assert (res.budget, res.n_selected) == (48, 36)  # the 36 questions' best answers, no more
    assert "36 rows answer distinct questions, fewer than the budget 48" in caplog.text
    assert len(_ids(tmp_path / "o" / "selected_random.jsonl")) == 48  # random: the whole pool


def test_router_data_without_prompt_keys_is_refused_by_name(tmp_path):
    # written without keys (the writer stores nulls): refused, not a rule that silently does nothing
    router, pool, _ = _twins(tmp_path / "nulls", keys=False)
    with pytest.raises(ValueError, match=r"prompt_key is null on every row of .*router"):
        _select(router, pool, tmp_path / "o0", one_answer_per_prompt=True)
    with pytest.raises(ValueError, match="64-bit integer hashes or None, got a float"):
        RouterDataWriter(tmp_path / "r", "x", 2, 4).write_batch(
            {"id": ["a"], "dataset": ["d"], "n_tokens": [1], "truncated": [False], "quality": [0.5],
             "quality_layers": [[0.5, 0.5]], "routing": np.ones((1, 8)), PROMPT_KEY: [1.5]}
        )  # fmt: skip
    router, pool, _ = _twins(tmp_path)
    shard = router / "shards" / "part-00000.parquet"
    pq.write_table(pq.read_table(shard).drop_columns([PROMPT_KEY]), shard)  # scored before the column
    with pytest.raises(
        ValueError, match=r"select.one_answer_per_prompt: .*part-00000.parquet has no prompt_key"
    ):
        _select(router, pool, tmp_path / "o", one_answer_per_prompt=True)
    assert _select(router, pool, tmp_path / "o2").n_selected == 12  # the rule off: nothing to read
