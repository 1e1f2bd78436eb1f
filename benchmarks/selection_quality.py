"""Selection quality on a finished demo run: every scorer x policy against the demo's hidden labels.

    python benchmarks/selection_quality.py /tmp/demo16-1 [--k K] [--floors 0.3 0.5] [--scorers gate ...] \
        [--rank-within dataset pool]

Reuses the run's router data (no rescoring): for each scorer (``select.score``) and policy it reruns
``run_select`` with the run's chosen k fixed (one k-means fit per call, no sweep; same seed), then prints
the known-bad share (and x pool), clusters covered and cluster-mix entropy, plus each scorer's AUC overall
and per corruption kind (``selectmoe.report.demo_figures``). ``--json`` writes everything to a file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

from selectmoe.config import load_config
from selectmoe.markdown import markdown_table
from selectmoe.report import demo_figures
from selectmoe.selection.policies import FLOOR_POLICIES
from selectmoe.selection.scorers import available_scorers
from selectmoe.stages.select import run_select

POLICIES = ("quality_sample", "quality_round_robin", "round_robin", "proportional", "top_k")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--k", type=int, help="clusters (default: the run's chosen k)")
    ap.add_argument("--floors", type=float, nargs="*", default=[0.5], help="quality_floor values to try")
    ap.add_argument("--scorers", nargs="*", help="scorers to rank by (default: every one with values)")
    ap.add_argument(
        "--rank-within", nargs="*", default=["dataset", "pool"], help="select.rank_within values to try"
    )
    ap.add_argument("--json", help="write all figures here")
    args = ap.parse_args()

    cfg = load_config("demo", [f"output_dir={args.run_dir}"])
    labels = Path(cfg.demo.dir) / "pool_labels.jsonl"
    run = demo_figures(cfg.score.output_dir, cfg.select.output_dir, labels)
    k = args.k or run["chosen_k"]
    from selectmoe.router_data import load_router_data

    scorers = args.scorers or available_scorers(load_router_data(cfg.score.output_dir))
    kinds = sorted({c for v in run["scorers"].values() for c in v if c != "overall"})
    print(f"pool: {run['pool']['n']} rows, known-bad share {run['pool']['bad_share']:.3f}; k = {k}\n")
    aucs = [[name, *(f"{v[c]:.3f}" for c in ("overall", *kinds))] for name, v in run["scorers"].items()]
    print(markdown_table(["scorer", "AUC overall", *kinds], aucs))
    rows = []
    with tempfile.TemporaryDirectory(prefix="selq-") as tmp:
        for within in args.rank_within:
            for score in scorers:
                for policy in POLICIES:
                    for floor in args.floors if policy in FLOOR_POLICIES else [None]:
                        out = Path(tmp) / f"{within}-{score}-{policy}-{floor}"
                        sel = dataclasses.replace(
                            cfg.select, output_dir=str(out), k=k, score=score, policy=policy, plots=False,
                            baselines=["random"], quality_floor=floor or cfg.select.quality_floor,
                            rank_within=within,
                        )  # fmt: skip
                        run_select(sel)
                        fig = demo_figures(cfg.score.output_dir, out, labels)
                        s, r = fig["sets"]["selected"], fig["sets"]["random"]
                        row = {"within": within, "score": score, "policy": policy, "floor": floor}
                        rows.append({**row, **s, "random": r["bad_share"]})
    header = [
        "ranked within", "score", "policy", "floor", "bad share", "x pool", "random", "clusters covered",
        "entropy_norm",
    ]  # fmt: skip
    cells = [
        [r["within"], r["score"], r["policy"], r["floor"] or "", f"{r['bad_share']:.3f}", f"{r['vs_pool']:.2f}",
         f"{r['random']:.3f}", f"{r['clusters_covered']}/{r['clusters']}", f"{r['entropy_norm']:.3f}"]
        for r in rows
    ]  # fmt: skip
    print(markdown_table(header, cells))
    if args.json:
        Path(args.json).write_text(json.dumps({"run": run, "k": k, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
