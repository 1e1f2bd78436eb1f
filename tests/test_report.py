"""The report's first screen: known-bad share vs pool vs random, coverage, every scorer's AUC."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from selectmoe.router_data import RouterDataWriter


def _demo_run(tmp_path):
    """Router data of 8 rows (4 clean, 2 noise, 2 truncate), hidden labels, two selection files."""
    ids = [f"r{i}" for i in range(8)]
    kinds = ["clean", "noise", "clean", "truncate", "clean", "noise", "clean", "truncate"]
    nll = np.array([1.0, 5.0, 1.5, 2.0, 1.2, 4.0, 0.9, 1.4])
    gate = np.array([0.9, 0.2, 0.5, 0.6, 0.7, 0.8, 0.4, 0.3])
    router = tmp_path / "router"
    w = RouterDataWriter(router, "s0", 1, 2)
    w.write_batch(
        {
            "id": ids, "dataset": ["d"] * 8, "n_tokens": np.full(8, 5), "truncated": np.zeros(8, bool),
            "quality": gate, "response_nll": nll, "sample_nll": nll / 2, "quality_layers": gate[:, None],
            "routing": np.full((8, 2), 0.5),
        }
    )  # fmt: skip
    w.close()
    labels = tmp_path / "assets" / "pool_labels.jsonl"
    labels.parent.mkdir()
    labels.write_text("".join(json.dumps({"id": i, "label": k}) + "\n" for i, k in zip(ids, kinds)))
    sel = tmp_path / "sel"
    sel.mkdir()
    for name, picked in (
        ("selected_data", ["r0", "r2", "r4", "r6"]),
        ("selected_random", ["r1", "r2", "r3", "r4"]),
    ):
        (sel / f"{name}.jsonl").write_text("".join(json.dumps({"id": i}) + "\n" for i in picked))
    diversity = {
        "selected": {"clusters_covered": 2, "clusters": 2, "coverage": 1.0, "entropy_norm": 1.0},
        "random": {"clusters_covered": 1, "clusters": 2, "coverage": 0.5, "entropy_norm": 0.0},
    }
    info = {"chosen_k": 2, "score": "response_nll", "policy": "quality_round_robin", "diversity": diversity}
    (sel / "selection.json").write_text(json.dumps(info))
    return router, sel, labels


def test_demo_figures_values(tmp_path):
    from selectmoe.report import demo_figures

    router, sel, labels = _demo_run(tmp_path)
    fig = demo_figures(router, sel, labels)
    assert fig["pool"] == {"n": 8, "bad_share": 0.5, "dataset_entropy_norm": 0.0}  # one dataset
    assert fig["sets"]["selected"]["bad_share"] == 0.0 and fig["sets"]["selected"]["clusters_covered"] == 2
    assert fig["sets"]["random"]["bad_share"] == 0.5 and fig["sets"]["random"]["vs_pool"] == 1.0
    assert fig["sets"]["random"]["coverage"] == 0.5
    # response NLL: clean {1.0, 1.5, 1.2, 0.9} vs noise {5, 4} -> 1.0; vs truncate {2.0, 1.4}: 7/8 pairs
    assert fig["scorers"]["response_nll"] == pytest.approx(
        {"overall": 15 / 16, "noise": 1.0, "truncate": 7 / 8}
    )
    # gate: clean {.9,.5,.7,.4} vs noise {.2,.8}: 2+1+1+1 = 5/8; vs truncate {.6,.3}: 2+1+2+1 = 6/8
    assert fig["scorers"]["gate"] == pytest.approx({"overall": 11 / 16, "noise": 5 / 8, "truncate": 6 / 8})
    assert (fig["chosen_k"], fig["score"], fig["rank_within"]) == (2, "response_nll", "pool")
    # ranked within datasets as select did: one dataset here, so the same AUCs
    info = json.loads((sel / "selection.json").read_text())
    (sel / "selection.json").write_text(json.dumps({**info, "rank_within": "dataset"}))
    within = demo_figures(router, sel, labels)
    assert within["rank_within"] == "dataset" and within["scorers"].keys() == fig["scorers"].keys()
    assert all(within["scorers"][name] == pytest.approx(v) for name, v in fig["scorers"].items())
    # an id without a label is an error, not a silent "clean"
    labels.write_text(labels.read_text().split("\n", 1)[1])
    with pytest.raises(ValueError, match="no label for 1 router-data ids"):
        demo_figures(router, sel, labels)


def test_report_leads_with_the_answer(tmp_path):
    from selectmoe.config import PipelineConfig
    from selectmoe.report import build_run_report

    router, sel, labels = _demo_run(tmp_path)
    cfg = PipelineConfig(output_dir=str(tmp_path / "run"))
    cfg.demo.enabled, cfg.demo.dir = True, str(labels.parent)
    cfg.score.output_dir, cfg.select.output_dir = str(router), str(sel)
    for stage in ("data", "evaluate"):
        node = getattr(cfg, stage)
        for key in ("ingest_dir", "output_dir"):
            if hasattr(node, key):
                setattr(node, key, str(tmp_path / "none"))
    warmup = tmp_path / "warmup"
    warmup.mkdir()
    probe = {
        "n_clean": 8,
        "per_corruption": {"swap_response": 0.5},
        "before": {"probe_gate_auc": 0.4, "probe_auc_swap_response": 0.45, "probe_response_nll_auc": 0.8},
        "after": {"probe_gate_auc": 0.6, "probe_response_nll_auc": 0.85, "probe_paired_win_rate": 0.7},
    }
    (warmup / "_manifest.json").write_text(json.dumps({"stage": "warmup", "extra": {"probe": probe}}))
    cfg.warmup.output_dir = str(warmup)
    truncated = (
        "score: 97.7% of sharegpt rows (2931/3000) truncated at 256 tokens; their scores describe a prefix"
    )
    (router / "_manifest.json").write_text(
        json.dumps({"stage": "score", "extra": {"truncation": {"warnings": [truncated]}}})
    )
    build_run_report(cfg)
    md = (tmp_path / "run" / "report" / "report.md").read_text()
    assert md.split("\n\n")[1] == f"> **Warning:** {truncated}"  # right under the title
    assert (
        f"<p><b>Warning:</b> {truncated}</p><h2>What the selection achieved"
        in (tmp_path / "run" / "report" / "report.html").read_text()
    )
    first = md.split("\n## ")[1]
    assert first.startswith("What the selection achieved")
    assert (
        "selected 0.000 vs pool 0.500 vs random 0.500 (0.00x the pool), 2/2 clusters covered, k = 2" in first
    )
    assert (
        "Its score separates clean from known-bad rows with AUC 0.938 (weakest kind: truncate 0.875" in first
    )
    assert "| response perplexity (selector NLL) | 0.938 | 1.000 | 0.875 |" in md
    # the warmup probe in readable rows: scorer, before, after
    assert "## Warmup probe: AUC of 8 held-out clean samples vs their corrupted twins" in md
    assert "| quality gate (seed method) | 0.4 | 0.6 |" in md
    assert "| response perplexity (selector NLL) | 0.8 | 0.85 |" in md
    assert "| quality gate, swap response twins | 0.45 | 0.5 |" in md
    assert "| quality gate, clean beats its own twin (share) |  | 0.7 |" in md


def test_report_selection_plots_are_the_select_stages(tmp_path):
    """The report embeds ``selection.plots``' figures (one drawing per plot), empty clusters included."""
    from selectmoe.report import Report, _selection
    from selectmoe.selection.plots import cluster_sizes_figure, k_sweep_figure

    curves = {"k": [2, 3, 4], "inertia": [9.0, 6.0, 5.5], "silhouette": [0.2, None, 0.3]}
    info = {"k_curves": curves, "chosen_k": 3, "k_choice": "elbow",
            "clusters": {"sizes": [5, 0, 7], "mean_quality": [0.4, None, 0.6]}}  # fmt: skip
    (tmp_path / "selection.json").write_text(json.dumps(info))

    report = Report("t")
    _selection(report, SimpleNamespace(select=SimpleNamespace(output_dir=str(tmp_path))))
    assert [h for h, _, _ in report.sections] == [
        "k sweep (chosen k = 3, rule elbow)",
        "Cluster sizes and mean quality",
    ]
    assert all(png.startswith(b"\x89PNG") for png in report.figures.values())
    fig = k_sweep_figure(curves["k"], curves["inertia"], curves["silhouette"], 3, "elbow")
    inertia, silhouette = (ax.lines[0].get_ydata() for ax in fig.axes)
    assert list(inertia) == [9.0, 6.0, 5.5] and np.isnan(silhouette[1]) and silhouette[2] == 0.3
    means = cluster_sizes_figure([5, 0, 7], [0.4, None, 0.6]).axes[1].lines[0].get_ydata()
    assert means[0] == 0.4 and np.isnan(means[1])


def _seed_evals(root, correct: dict[str, list[int]], n: int = 100) -> list:
    """One evaluate dir per seed: ``run -> first k of n questions right`` (comparison + per question)."""
    from selectmoe.stages.evaluate import comparison_rows

    dirs = []
    for s in range(len(next(iter(correct.values())))):
        d = root / "seeds" / f"seed_{s}" / "evaluate"
        runs = {run: {"selectmoe_demo": {"acc": k[s] / n, "acc_norm": 0.3}} for run, k in correct.items()}
        d.mkdir(parents=True)
        (d / "comparison.json").write_text(json.dumps({"runs": runs, "rows": comparison_rows(runs)}))
        for run, k in correct.items():
            (d / run).mkdir()
            acc = [1.0] * k[s] + [0.0] * (n - k[s])
            (d / run / "per_question.json").write_text(json.dumps({"selectmoe_demo": {"acc": acc}}))
        dirs.append(d)
    return dirs


def test_report_eval_arms_over_seeds(tmp_path):
    """Three seeds' per-question results -> paired selected - arm with its interval on the first screen."""
    from selectmoe.config import PipelineConfig
    from selectmoe.report import build_run_report, eval_arms, eval_verdict, paired_vs_arms

    correct = {"base": [50, 50, 50], "selected": [70, 71, 72], "random": [60, 60, 60], "top_k": [72, 71, 70]}
    dirs = _seed_evals(tmp_path / "run", correct)
    comparisons = [json.loads((d / "comparison.json").read_text()) for d in dirs]
    arms, n = eval_arms(comparisons, "selectmoe_demo")
    assert n == 3 and arms["selected"]["mean"] == pytest.approx(0.71)
    paired = paired_vs_arms(dirs, "selectmoe_demo")
    assert list(paired) == ["random", "top_k", "base"]
    assert paired["random"].seed_means == pytest.approx((0.10, 0.11, 0.12))
    assert paired["top_k"].mean == 0.0 and paired["top_k"].low < 0 < paired["top_k"].high
    lines = eval_verdict(arms, paired)
    assert (
        lines[0]
        == "Demo eval accuracy (mean over 3 seeds): selected 0.710, random 0.600, top-k 0.710, base 0.500."
    )
    # 33 of 300 questions +1, the rest 0: SE sqrt(0.11 * 0.89 / 300) = 0.018
    assert lines[1].startswith("selected - random = +0.110 (paired 95% interval +0.07")
    assert lines[1].endswith("300 questions, 3 seeds): selected beat random: the whole interval is above 0.")
    assert "no evidence that selected differs from top-k" in lines[2]
    assert lines[-1].endswith("is met.")
    one = paired_vs_arms(dirs[:1], "selectmoe_demo")
    assert "1 seed)" in eval_verdict(eval_arms(comparisons[:1], "selectmoe_demo")[0], one)[1]

    router, sel, labels = _demo_run(tmp_path)
    cfg = PipelineConfig(output_dir=str(tmp_path / "run"))
    cfg.demo.enabled, cfg.demo.dir = True, str(labels.parent)
    cfg.score.output_dir, cfg.select.output_dir = str(router), str(sel)
    cfg.evaluate.output_dir = str(dirs[0])  # this run is seed 0: counted once
    cfg.data.ingest_dir = cfg.warmup.output_dir = str(tmp_path / "none")
    build_run_report(cfg)
    md = (tmp_path / "run" / "report" / "report.md").read_text()
    sections = md.split("\n## ")
    assert sections[1].startswith("What the selection achieved") and "is met." in sections[1]
    assert "selected - random = +0.110" in sections[1] and "selected - base = +0.210" in sections[1]
    assert sections[2].startswith("Did selection help? Demo eval accuracy after a LoRA finetune")
    assert "| selected (this pipeline) | 0.710 ± 0.006 | +0.210 | 3 | 0.700 0.710 0.720 |" in md
    assert "| base target, no finetune | 0.500 ± 0.000 | +0.000 | 3 | 0.500 0.500 0.500 |" in md
    # the per-run lm-eval table has readable column labels, not raw metric keys
    assert "| finetuned on | selectmoe_demo: accuracy | selectmoe_demo: accuracy (length-normalised) |" in md


def test_report_says_when_selection_did_not_help(tmp_path):
    from selectmoe.report import eval_arms, eval_verdict, paired_vs_arms

    dirs = _seed_evals(tmp_path, {"base": [60], "selected": [62], "random": [64]})
    arms, _ = eval_arms([json.loads((d / "comparison.json").read_text()) for d in dirs], "selectmoe_demo")
    lines = eval_verdict(arms, paired_vs_arms(dirs, "selectmoe_demo"))
    assert (
        "selected - random = -0.020" in lines[1]
        and "no evidence that selected differs from random" in lines[1]
    )
    assert lines[-1].endswith(
        "is missed: this demo does not show that the selection improves the finetuned model."
    )


def test_dataset_mix_entropy_by_hand():
    from selectmoe.report import _entropy_norm

    assert _entropy_norm(["a", "a", "b", "b"], 2) == pytest.approx(1.0)
    # p = (3/4, 1/4): -(.75 ln .75 + .25 ln .25) / ln 2 = 0.8113
    assert _entropy_norm(["a", "a", "a", "b"], 2) == pytest.approx(0.811278, abs=1e-6)
    assert _entropy_norm(["a", "a"], 4) == 0.0 and _entropy_norm([], 3) == 0.0
