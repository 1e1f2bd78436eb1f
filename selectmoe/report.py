"""Run reports: one self-contained ``report.html`` (PNGs embedded) + ``report.md`` per run.

``build_router_report`` is the router-data analysis alone (quality distributions, per-layer gate means,
expert usage per dataset); ``build_run_report`` adds stage timings, counts, the k curves, clusters, probe
AUC, the evaluation table and, for the demo, first of all: how many known-bad samples each selection kept,
its cluster coverage, each scorer's AUC against the hidden labels, and whether selection helped: per
question, selected - arm for every other finetune arm and the base, with its paired 95% interval, pooled
over this run and the seeds of ``benchmarks/demo_seeds.py`` when it ran.
Every section is optional: a run that stopped early still gets a report of what exists.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from selectmoe.config import STAGES, PipelineConfig
from selectmoe.eval_tasks import DEMO_TASK
from selectmoe.evaluation.paired import PairedDifference, paired_difference, paired_verdict
from selectmoe.manifest import read_manifest
from selectmoe.markdown import markdown_table
from selectmoe.router_data import TEXT_COLUMNS
from selectmoe.selection.plots import cluster_sizes_figure, k_sweep_figure, pyplot
from selectmoe.selection.scorers import TEXT_FLAGS
from selectmoe.stages.evaluate import PER_QUESTION


@dataclass
class Report:
    title: str
    sections: list[tuple[str, str, str]] = field(default_factory=list)  # (heading, markdown, html)
    figures: dict[str, bytes] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # shown under the title, above every section

    def text(self, heading: str, body_md: str) -> None:
        self.sections.append((heading, body_md, f"<p>{html.escape(body_md)}</p>"))

    def items(self, heading: str, lines: list[str]) -> None:
        """A short bullet list: the first screen reads as separate answers, not one paragraph."""
        md = "".join(f"- {line}\n" for line in lines)
        lis = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
        self.sections.append((heading, md, f"<ul>{lis}</ul>"))

    def table(self, heading: str, header: list[str], rows: list[list[Any]]) -> None:
        md = markdown_table(header, rows, _fmt)
        th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        trs = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
        self.sections.append((heading, md, f"<table><tr>{th}</tr>{trs}</table>"))

    def figure(self, heading: str, name: str, fig) -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        pyplot().close(fig)
        png = buf.getvalue()
        self.figures[name] = png
        b64 = base64.b64encode(png).decode()
        self.sections.append(
            (heading, f"![{name}]({name})", f'<img alt="{name}" src="data:image/png;base64,{b64}">')
        )

    def write(self, out_dir: Path) -> dict[str, str]:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, png in self.figures.items():
            (out_dir / name).write_bytes(png)
        md = f"# {self.title}\n\n" + "".join(f"> **Warning:** {w}\n\n" for w in self.warnings)
        md += "".join(f"## {h}\n\n{m}\n\n" for h, m, _ in self.sections)
        body = "".join(f"<p><b>Warning:</b> {html.escape(w)}</p>" for w in self.warnings)
        body += "".join(f"<h2>{html.escape(h)}</h2>{x}" for h, _, x in self.sections)
        page = (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
            "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
            "td:first-child,th:first-child{text-align:left}li{margin:.3em 0}"
            "img{max-width:100%}</style></head>"
            f"<body><h1>{html.escape(self.title)}</h1>{body}</body></html>"
        )
        (out_dir / "report.md").write_text(md)
        (out_dir / "report.html").write_text(page)
        return {"html": str(out_dir / "report.html"), "md": str(out_dir / "report.md")}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


# --- router-data analysis -----------------------------------------------------------------------


def add_router_sections(report: Report, router_dir: Path) -> None:
    from selectmoe.router_data import iter_feature_blocks, load_router_data

    data = load_router_data(router_dir)
    plt = pyplot()
    datasets, ds_index = np.unique(np.asarray(data.datasets), return_inverse=True)
    datasets = datasets.tolist()
    scorer = ((read_manifest(router_dir) or {}).get("extra") or {}).get("scorer") or {}
    if scorer:
        report.table(
            "Scorer model",
            ["model", "kind", "architecture", "signals"],
            [
                [
                    scorer.get("model_dir"),
                    scorer.get("kind"),
                    scorer.get("architecture"),
                    ", ".join(scorer.get("signals", [])),
                ]
            ],
        )
    gate = data.quality is not None
    report.table(
        "Router data",
        [
            "samples",
            "datasets",
            "layers",
            "experts",
            "hidden dim",
            "truncated",
            "mean quality",
            "mean tokens",
        ],
        [
            [
                len(data),
                len(datasets),
                data.num_layers,
                data.num_experts,
                data.hidden_dim,
                int(data.truncated.sum()),
                float(data.quality.mean()) if gate else None,
                float(data.n_tokens.mean()),
            ]
        ],
    )
    signals = [c for c in TEXT_COLUMNS if np.isfinite(getattr(data, c)).any()]
    if signals:
        report.table(
            "Answer text signals (mean, 95th percentile, share over the ranking's flag)",
            ["signal", "mean", "p95", "flagged"],
            [
                [
                    c,
                    float(np.nanmean(getattr(data, c))),
                    float(np.nanpercentile(getattr(data, c), 95)),
                    float(np.mean(getattr(data, c) > TEXT_FLAGS[c])) if c in TEXT_FLAGS else None,
                ]
                for c in signals
            ],
        )
    if gate:
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.hist(data.quality, bins=50, color="#4477aa")
        ax.set_xlabel("quality (mean gate g)")
        ax.set_ylabel("samples")
        report.figure("Quality distribution", "quality_hist.png", fig)

        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.boxplot([data.quality[ds_index == i] for i in range(len(datasets))], showfliers=False)
        ax.set_xticks(range(1, len(datasets) + 1), datasets, rotation=30, ha="right")
        ax.set_ylabel("quality")
        report.figure("Quality per dataset", "quality_per_dataset.png", fig)

        fig, ax = plt.subplots(figsize=(7, 3.2))
        layer_means = data.quality_layers.mean(axis=0)
        ax.bar(range(data.num_layers), layer_means, color="#228833")
        ax.set_xlabel("layer")
        ax.set_ylabel("mean gate g")
        report.figure("Mean gate value per layer", "gate_per_layer.png", fig)

    if data.num_experts:  # a dense scorer has no routing
        # Streamed row group by row group: the routing matrix is never whole in memory.
        usage = np.zeros((len(datasets), data.num_experts))
        start = 0
        for _, block in iter_feature_blocks(data.shards, "routing"):
            codes = ds_index[start : start + len(block)]
            per_expert = block.astype(np.float32).reshape(len(block), data.num_layers, -1).mean(axis=1)
            np.add.at(usage, codes, per_expert)
            start += len(block)
        usage /= np.maximum(np.bincount(ds_index, minlength=len(datasets)), 1)[:, None]
        fig, ax = plt.subplots(figsize=(7, 0.5 + 0.35 * len(datasets)))
        im = ax.imshow(usage, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(datasets)), datasets)
        ax.set_xlabel("expert (mean routing probability over layers)")
        fig.colorbar(im, ax=ax)
        report.figure("Expert usage per dataset", "expert_usage.png", fig)


def build_router_report(router_dir: Path, out_dir: Path) -> dict[str, str]:
    report = Report(f"selectmoe router data: {router_dir}")
    add_router_sections(report, Path(router_dir))
    return report.write(Path(out_dir))


# --- full run ------------------------------------------------------------------------------------


def build_run_report(cfg: PipelineConfig) -> dict[str, Any]:
    out_dir = Path(cfg.output_dir) / "report"
    report = Report(f"selectmoe run: {cfg.output_dir}")
    for directory in (cfg.warmup.output_dir, cfg.score.output_dir):  # truncated datasets (data.truncation)
        extra = (read_manifest(directory) or {}).get("extra") or {}
        report.warnings += (extra.get("truncation") or {}).get("warnings", [])
    _answer(report, cfg)
    _timings(report, cfg)
    _counts(report, cfg)
    _probe(report, cfg)
    if (Path(cfg.score.output_dir) / "shards").is_dir():
        add_router_sections(report, Path(cfg.score.output_dir))
    _selection(report, cfg)
    _evaluation(report, cfg)
    paths = report.write(out_dir)
    return {**paths, "sections": len(report.sections)}


def _timings(report: Report, cfg: PipelineConfig) -> None:
    rows = []
    for stage in ("demo", *STAGES):  # pipeline order
        rec = Path(cfg.output_dir) / "_pipeline" / f"{stage}.json"
        if rec.is_file():
            rows.append([stage, json.loads(rec.read_text()).get("wall_s")])
    if rows:
        rows.append(["total", round(sum(float(r[1] or 0.0) for r in rows), 3)])
        report.table("Stage timings (s)", ["stage", "wall s"], rows)


def _counts(report: Report, cfg: PipelineConfig) -> None:
    rows = []
    for stage, directory in (
        ("ingest", cfg.data.ingest_dir),
        ("score", cfg.score.output_dir),
        ("select", cfg.select.output_dir),
    ):
        manifest = read_manifest(directory) or {}
        for key, value in (manifest.get("counts") or {}).items():
            if isinstance(value, (int, float)):
                rows.append([stage, key, value])
    if rows:
        report.table("Counts", ["stage", "count", "value"], rows)


def _probe(report: Report, cfg: PipelineConfig) -> None:
    """The warmup probe as readable rows: each scorer before/after warmup, then the gate per corruption."""
    manifest = read_manifest(cfg.warmup.output_dir) or {}
    found = _find_key(manifest, "probe")
    if not isinstance(found, dict):
        return
    before, after = found.get("before") or {}, found.get("after") or {}
    rows = []
    for name, label in SCORER_LABELS.items():
        key = f"probe_{name}_auc"
        if key in after or key in before:
            rows.append([label, before.get(key), after.get(key)])
    for kind, value in sorted((found.get("per_corruption") or {}).items()):
        rows.append([f"quality gate, {kind.replace('_', ' ')} twins", before.get(f"probe_auc_{kind}"), value])
    if "probe_paired_win_rate" in after:
        rows.append(["quality gate, clean beats its own twin (share)", before.get("probe_paired_win_rate"),
                     after["probe_paired_win_rate"]])  # fmt: skip
    if not rows:  # an older manifest: show what it has
        rows = [[k, None, v] for k, v in _flatten(found).items() if isinstance(v, (int, float))]
    report.table(
        f"Warmup probe: AUC of {found.get('n_clean', '?')} held-out clean samples vs their corrupted twins",
        ["scorer", "before warmup", "after warmup"],
        rows,
    )


def _selection(report: Report, cfg: PipelineConfig) -> None:
    path = Path(cfg.select.output_dir) / "selection.json"
    if not path.is_file():
        return
    sel = json.loads(path.read_text())
    curves = sel.get("k_curves") or sel.get("curves") or {}
    ks = curves.get("k") or []
    if ks:
        chosen, rule = sel.get("chosen_k") or sel.get("k"), sel.get("k_choice", "")
        fig = k_sweep_figure(ks, curves.get("inertia", []), curves.get("silhouette") or [], chosen, rule)
        report.figure(f"k sweep (chosen k = {chosen}, rule {rule})", "k_sweep.png", fig)
    clusters = sel.get("clusters") or {}
    if clusters.get("sizes"):
        fig = cluster_sizes_figure(clusters["sizes"], clusters.get("mean_quality") or [])
        report.figure("Cluster sizes and mean quality", "clusters.png", fig)
    counts = sel.get("counts") or {}
    if counts:
        report.table("Selection", ["count", "value"], [[k, v] for k, v in counts.items()])
    if sel.get("target"):
        _targeted(report, sel["target"])


def _targeted(report: Report, target: dict[str, Any]) -> None:
    """Targeted selection: per target task, each set's mean best cosine similarity to its examples, and
    what computing it cost (scoring the examples, then one pass over the pool's features)."""
    sims = target.get("mean_similarity") or {}
    sets = list(sims)
    rows = [
        [task, n, *[(sims[s] or {}).get(task) for s in sets]]
        for task, n in (target.get("tasks") or {}).items()
    ]
    how = "cached" if target.get("cached") else "scored"
    report.table(
        f"Targeted selection ({target.get('features')} features): mean best similarity to the target examples "
        f"(examples {how} in {target.get('wall_s')} s, pool similarity {target.get('similarity_s')} s)",
        ["target task", "examples", *sets],
        rows,
    )


SET_NAMES = {"selected_data": "selected", "selected_random": "random", "selected_top_k": "top_k"}


def demo_figures(router_dir: str | Path, select_dir: str | Path, labels_path: str | Path) -> dict[str, Any]:
    """What the selection achieved against the demo's hidden labels (the pipeline never reads them).

    ``scorers``: each scorer's ROC AUC, clean vs bad, overall and per corruption kind, on the whole pool;
    ``sets``: for the selection and every baseline file, its size, known-bad share (and that share / the
    pool's) and the cluster diversity ``select`` recorded. Every router-data id must have a label."""
    from selectmoe.demo import read_demo_labels
    from selectmoe.router_data import load_router_data
    from selectmoe.selection.scorers import rank_groups, scorer_aucs

    labels = read_demo_labels(labels_path)
    rd = load_router_data(router_dir)
    unlabelled = [i for i in rd.ids if i not in labels]
    if unlabelled:
        raise ValueError(
            f"{labels_path}: no label for {len(unlabelled)} router-data ids, e.g. {unlabelled[:3]}"
        )
    kinds = [labels[i] for i in rd.ids]
    pool_bad = float(np.mean([k != "clean" for k in kinds]))
    sel_path = Path(select_dir) / "selection.json"
    sel = json.loads(sel_path.read_text()) if sel_path.is_file() else {}
    sets = {}
    dataset_of = dict(zip(rd.ids, rd.datasets, strict=True))
    n_datasets = len(set(rd.datasets))
    for path in sorted(Path(select_dir).glob("selected*.jsonl")):
        name = SET_NAMES.get(path.stem, path.stem.removeprefix("selected_"))
        ids = [json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()]
        bad = float(np.mean([labels[i] != "clean" for i in ids])) if ids else float("nan")
        sets[name] = {
            "n": len(ids),
            "bad_share": bad,
            "vs_pool": bad / pool_bad if pool_bad else float("nan"),
            "dataset_entropy_norm": _entropy_norm([dataset_of[i] for i in ids], n_datasets),
            **(sel.get("diversity") or {}).get(name, {}),
        }
    return {
        "pool": {
            "n": len(kinds),
            "bad_share": pool_bad,
            "dataset_entropy_norm": _entropy_norm(rd.datasets, n_datasets),
        },
        "sets": sets,
        "scorers": scorer_aucs(rd, kinds, groups=rank_groups(rd, sel.get("rank_within", "pool"))),
        "rank_within": sel.get("rank_within", "pool"),
        "chosen_k": sel.get("chosen_k"),
        "score": sel.get("score"),
        "policy": sel.get("policy"),
    }


def _entropy_norm(values: list[str], n_kinds: int) -> float:
    """Entropy of the mix of ``values`` / ln(``n_kinds``): 1 = even over all kinds, 0 = one kind."""
    if n_kinds < 2 or not values:
        return 0.0
    _, counts = np.unique(np.asarray(values, dtype=object), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum() / np.log(n_kinds))


SCORER_LABELS = {
    "gate": "quality gate (seed method)",
    "response_nll": "response perplexity (selector NLL)",
    "sample_nll": "whole-sample perplexity",
    "ifd": "IFD (answer NLL with / without its question)",
    "gate_ppl_rank": "rank average gate + response perplexity",
    "nll_ifd_min": "worse rank of response perplexity and IFD",
}


def _auc(value: float | None) -> str | None:
    return None if value is None else f"{value:.3f}"


def _answer(report: Report, cfg: PipelineConfig) -> None:
    """The first screen: bad share vs pool vs random, coverage, each scorer's AUC (demo labels)."""
    labels_path = Path(cfg.demo.dir) / "pool_labels.jsonl"
    if (
        not cfg.demo.enabled
        or not labels_path.is_file()
        or not (Path(cfg.score.output_dir) / "shards").is_dir()
    ):
        return
    fig = demo_figures(cfg.score.output_dir, cfg.select.output_dir, labels_path)
    pool = fig["pool"]
    sets = fig["sets"]
    chosen = sets.get("selected", {})
    rnd = sets.get("random", {})
    arms, n_files = eval_arms(_comparisons(cfg), DEMO_TASK)
    verdict = eval_verdict(arms, paired_vs_arms(eval_dirs(cfg), DEMO_TASK))
    if chosen:
        lines = [
            f"Known-bad share: selected {chosen['bad_share']:.3f} vs pool {pool['bad_share']:.3f} vs random "
            f"{rnd.get('bad_share', float('nan')):.3f} ({chosen['vs_pool']:.2f}x the pool), "
            f"{chosen.get('clusters_covered', '?')}/{chosen.get('clusters', '?')} clusters covered, "
            f"k = {fig['chosen_k']}; ranked by {SCORER_LABELS.get(fig['score'], fig['score'])}"
            f"{' (within each dataset)' if fig['rank_within'] == 'dataset' else ''}, policy {fig['policy']}.",
        ]
        ranked = fig["scorers"].get(fig["score"])
        if ranked:
            worst = min((k for k in ranked if k != "overall"), key=ranked.get)
            lines.append(
                f"Its score separates clean from known-bad rows with AUC {ranked['overall']:.3f} "
                f"(weakest kind: {worst} {ranked[worst]:.3f}; every scorer below)."
            )
        report.items("What the selection achieved", [*lines, *verdict])
    if arms:
        _arms_table(report, arms, n_files)
    rows = [
        [
            "pool",
            pool["n"],
            f"{pool['bad_share']:.3f}",
            "1.00",
            None,
            None,
            f"{pool['dataset_entropy_norm']:.2f}",
        ]
    ]
    for name, v in sets.items():
        label = f"selected: {fig['policy']}" if name == "selected" else RUN_LABELS.get(name, name)
        entropy = v.get("entropy_norm")
        rows.append(
            [label, v["n"], f"{v['bad_share']:.3f}", f"{v['vs_pool']:.2f}",
             f"{v.get('clusters_covered', '')}/{v.get('clusters', '')}",
             None if entropy is None else f"{entropy:.2f}", f"{v['dataset_entropy_norm']:.2f}"]
        )  # fmt: skip
    report.table(
        "Known-bad share and diversity per selection (demo labels, hidden from the pipeline)",
        ["set", "samples", "known-bad share", "x pool", "clusters covered", "cluster-mix entropy (1 = even)",
         "dataset-mix entropy (1 = even)"],
        rows,
    )  # fmt: skip
    kinds = sorted({k for v in fig["scorers"].values() for k in v if k != "overall"})
    within = " (each row ranked among its own dataset's)" if fig["rank_within"] == "dataset" else ""
    report.table(
        f"Scorer AUC, clean vs known-bad, whole pool{within} (1 = perfect, 0.5 = chance)",
        ["scorer", "overall", *kinds],
        [
            [SCORER_LABELS.get(n, n), *[_auc(v.get(k)) for k in ("overall", *kinds)]]
            for n, v in fig["scorers"].items()
        ],
    )


SEEDS_DIR = "seeds"  # <output_dir>/seeds/seed_<s>/evaluate: benchmarks/demo_seeds.py's extra-seed runs
RUN_LABELS = {
    "base": "base target, no finetune",
    "selected": "selected (this pipeline)",
    "random": "random, same budget",
    "top_k": "top-k by score, same budget",
    "proportional": "proportional, same budget",
    "quality_round_robin": "quality floor, each cluster's best first, same budget",
    "targeted": "targeted: each target task's neighbourhood, sampled, same budget",
    "rds": "RDS+: nearest to the targets first, same budget",
    "full_pool": "full pool",
}
RUN_SHORT = {
    "top_k": "top-k",
    "full_pool": "full pool",
    "base": "base",
    "quality_round_robin": "best-first in the floor",
}  # the verdict's arm names
PAIRED_ORDER = ("random", "top_k", "proportional", "quality_round_robin", "full_pool", "base")
METRIC_LABELS = {
    "acc": "accuracy",
    "acc_norm": "accuracy (length-normalised)",
    "exact_match": "exact match",
    "f1": "F1",
}


def eval_dirs(cfg: PipelineConfig) -> list[Path]:
    """This run's evaluate dir and those of ``benchmarks/demo_seeds.py``'s runs (``<output_dir>/seeds/*``,
    each a whole demo with its own seed: pool, pre-training, eval questions, selection, finetune)."""
    own = Path(cfg.evaluate.output_dir).resolve()
    seeds = sorted(d.resolve() for d in (Path(cfg.output_dir) / SEEDS_DIR).glob("*/evaluate"))
    return [d for d in [own, *(d for d in seeds if d != own)] if (d / "comparison.json").is_file()]


def _comparisons(cfg: PipelineConfig) -> list[dict]:
    """One evaluate ``comparison.json`` per seed (this run's and the seed study's)."""
    return [json.loads((d / "comparison.json").read_text()) for d in eval_dirs(cfg)]


def eval_arms(
    comparisons: list[dict], task: str, metric: str = "acc"
) -> tuple[dict[str, dict[str, Any]], int]:
    """Per finetune arm (and ``base``): ``task``'s ``metric`` over the seeds' comparisons, as ``{"n",
    "mean", "se", "values"}`` (``se`` = sample std / sqrt(n), ``None`` for one seed); and the seed count."""
    values: dict[str, list[float]] = {}
    for comp in comparisons:
        for run, tasks in (comp.get("runs") or {}).items():
            value = (tasks.get(task) or {}).get(metric)
            if value is not None:
                values.setdefault(run, []).append(float(value))
    arms = {}
    for run, vals in values.items():
        n = len(vals)
        se = float(np.std(vals, ddof=1) / np.sqrt(n)) if n > 1 else None
        arms[run] = {"n": n, "mean": float(np.mean(vals)), "se": se, "values": vals}
    return arms, len(comparisons)


def _pm(arm: dict[str, Any]) -> str:
    return f"{arm['mean']:.3f}" + (f" ± {arm['se']:.3f}" if arm["se"] is not None else "")


def per_question_runs(eval_dir: str | Path, task: str, metric: str = "acc") -> dict[str, np.ndarray]:
    """``run -> each question's metric`` from an evaluate dir's ``<run>/per_question.json``."""
    out = {}
    for path in sorted(Path(eval_dir).glob(f"*/{PER_QUESTION}.json")):
        table = json.loads(path.read_text()).get(task) or {}
        if metric in table:
            out[path.parent.name] = np.asarray(table[metric], dtype=np.float64)
    return out


def paired_vs_arms(
    dirs: list[Path], task: str, *, reference: str = "selected", metric: str = "acc"
) -> dict[str, PairedDifference]:
    """``arm -> reference - arm`` per question, paired within each evaluate dir (seed), pooled over the
    dirs that have both runs; arms in the report's order (random, top-k, ..., full pool, base)."""
    per_seed = [per_question_runs(d, task, metric) for d in dirs]
    names = {run for runs in per_seed for run in runs} - {reference}
    out = {}
    for arm in [*[r for r in PAIRED_ORDER if r in names], *sorted(names - set(PAIRED_ORDER))]:
        pairs = [(runs[reference], runs[arm]) for runs in per_seed if reference in runs and arm in runs]
        if pairs:
            out[arm] = paired_difference([a for a, _ in pairs], [b for _, b in pairs])
    return out


def eval_verdict(arms: dict[str, dict[str, Any]], paired: dict[str, PairedDifference]) -> list[str]:
    """The answer, one line per arm: selected - arm per question with its 95% interval, in words; then
    whether the demo's target (selected beats random beyond noise, and the base target) is met."""
    sel = arms.get("selected")
    if not sel or not paired:
        return []
    accs = ", ".join(
        f"{RUN_SHORT.get(r, r)} {arms[r]['mean']:.3f}" for r in ["selected", *paired] if r in arms
    )
    seeds = f"mean over {sel['n']} seeds" if sel["n"] > 1 else "one seed"
    lines = [f"Demo eval accuracy ({seeds}): {accs}."]
    lines += [paired_verdict(d, "selected", RUN_SHORT.get(arm, arm)) for arm, d in paired.items()]
    rnd, base = paired.get("random"), paired.get("base")
    if rnd is not None and base is not None:
        met = rnd.helped and base.mean > 0
        lines.append(
            "The demo's target (selected beats random with the paired 95% interval above 0, and beats the base "
            f"target) is {'met' if met else 'missed'}"
            + ("." if met else ": this demo does not show that the selection improves the finetuned model.")
        )
    return lines


def _arms_table(report: Report, arms: dict[str, dict[str, Any]], n_seeds: int) -> None:
    base = arms.get("base")
    order = [*RUN_LABELS, *sorted(set(arms) - set(RUN_LABELS))]
    rows = [
        [RUN_LABELS.get(run, run), _pm(arms[run]), "" if base is None else f"{arms[run]['mean'] - base['mean']:+.3f}",
         arms[run]["n"], " ".join(f"{v:.3f}" for v in arms[run]["values"])]
        for run in order if run in arms
    ]  # fmt: skip
    seeds = f"{n_seeds} seeds" if n_seeds > 1 else "1 seed"
    report.table(
        f"Did selection help? Demo eval accuracy after a LoRA finetune on each set (mean ± SE, {seeds})",
        ["finetuned on", "accuracy", "vs base", "seeds", "per seed"],
        rows,
    )


def _metric_label(column: str) -> str:
    """``selectmoe_demo/acc_norm`` -> ``selectmoe_demo: accuracy (length-normalised)``."""
    task, _, metric = column.partition("/")
    name, _, filt = metric.partition(",")
    label = METRIC_LABELS.get(name, name.replace("_", " "))
    return f"{task}: {label}" + (f" ({filt})" if filt else "")


def _evaluation(report: Report, cfg: PipelineConfig) -> None:
    path = Path(cfg.evaluate.output_dir) / "comparison.json"
    if not path.is_file():
        return
    comp = json.loads(path.read_text())
    rows_in = comp.get("rows", comp) if isinstance(comp, dict) else comp
    if isinstance(rows_in, dict):
        rows_in = [
            {"run": k, **v} if isinstance(v, dict) else {"run": k, "value": v} for k, v in rows_in.items()
        ]
    header = sorted({k for r in rows_in for k in r if k != "run"})
    report.table(
        "Evaluation (lm-eval, this run)",
        ["finetuned on", *[_metric_label(h) for h in header]],
        [[RUN_LABELS.get(r.get("run"), r.get("run")), *[r.get(h) for h in header]] for r in rows_in],
    )


def _find_key(obj: Any, needle: str) -> Any:
    if isinstance(obj, dict):
        for key, value in obj.items():
            if needle in str(key).lower() and isinstance(value, dict):
                return value
            found = _find_key(value, needle)
            if found is not None:
                return found
    return None


def _flatten(obj: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
