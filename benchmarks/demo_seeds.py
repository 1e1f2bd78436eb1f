"""Did selection help? The whole demo over several seeds, compared per question (paired bootstrap).

Each seed is a whole ``selectmoe demo`` with ``seed=<s>`` in ``OUT/seeds/seed_<s>/``: its own pool,
pre-trained selector base and target, eval questions, selection and finetunes (a seed that only reran
select and finetune on one build would measure one pool's luck, not the method). ``--full-pool`` adds the
arm trained on every ingested row for the same number of steps as the selected arm (``epochs`` x the
selection share, at least one epoch: 1 epoch of the pool against 10 of a 10% selection). Prints
each arm's accuracy per seed and ``selected - arm`` per question with its 95% interval, pooled over the
seeds and ``OUT``'s own run; ``selectmoe report demo output_dir=OUT`` puts the same on the report's first
screen. A finished seed is not rerun (every stage's manifest matches).

    PYTHONPATH=$PWD python benchmarks/demo_seeds.py --out outputs/demo --seeds 0 1 2 --full-pool
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

PRE_FINETUNE = ("demo", "ingest", "convert", "warmup", "score", "select")


def write_full_pool(ingest_dir: str, path: Path) -> int:
    """Every ingested row as a selection-format JSONL line (the finetune stage reads ``messages``)."""
    from selectmoe.data.ingest import iter_ingested_records

    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as fh:
        for row in iter_ingested_records(ingest_dir):
            record = {"dataset": row["dataset"], "id": row["id"], "messages": row["messages"]}
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n


def run_seed(out: Path, seed: int, *, full_pool: bool, extra: list[str]) -> Path:
    """The whole demo for ``seed`` under ``out/seeds/seed_<seed>``; returns that run's output dir."""
    from selectmoe.config import load_config
    from selectmoe.pipeline import run_pipeline
    from selectmoe.report import SEEDS_DIR

    run = out / SEEDS_DIR / f"seed_{seed}"
    overrides = [f"output_dir={run}", f"seed={seed}", *extra]
    if full_pool:
        cfg = load_config("demo", overrides)
        run_pipeline(cfg, only=list(PRE_FINETUNE))
        write_full_pool(cfg.data.ingest_dir, run / "full_pool.jsonl")
        epochs = max(1, round(cfg.finetune.epochs * cfg.select.selection_percentage))
        overrides += [
            f"finetune.train_files.full_pool={run}/full_pool.jsonl",
            f"finetune.epochs_by_run.full_pool={epochs}",
        ]
    run_pipeline(load_config("demo", overrides))
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="outputs/demo", help="a finished `selectmoe demo --out` directory")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--full-pool", action="store_true", help="also finetune on the whole pool")
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()

    from selectmoe.config import load_config
    from selectmoe.report import (
        DEMO_TASK,
        build_run_report,
        eval_arms,
        eval_dirs,
        eval_verdict,
        paired_vs_arms,
    )

    main_cfg = load_config("demo", [f"output_dir={out}", *args.overrides])
    if main_cfg.seed in args.seeds:
        parser.error(f"seed {main_cfg.seed} is {out}'s own run (the same build, the same figures)")
    for seed in args.seeds:
        t0 = time.perf_counter()
        run_seed(out, seed, full_pool=args.full_pool, extra=args.overrides)
        print(f"seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)

    dirs = eval_dirs(main_cfg)
    arms, n = eval_arms([json.loads((d / "comparison.json").read_text()) for d in dirs], DEMO_TASK)
    print(f"\n{DEMO_TASK} accuracy over {n} runs ({', '.join(str(d.parent) for d in dirs)}):")
    print("| finetuned on | mean | per run |\n|---|---|---|")
    for run, arm in arms.items():
        print(f"| {run} | {arm['mean']:.3f} | {' '.join(f'{v:.3f}' for v in arm['values'])} |")
    print("\n" + "\n".join(eval_verdict(arms, paired_vs_arms(dirs, DEMO_TASK))))
    if (Path(main_cfg.score.output_dir) / "shards").is_dir():
        build_run_report(main_cfg)
        print(f"report: {out / 'report' / 'report.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
