"""Did selection help? The demo's finetune arms over several seeds (mean ± standard error).

Reuses one finished ``selectmoe demo --out OUT`` (its assets, ingest and score outputs: those do not
depend on the finetune seed) and, per seed, reruns select (k-means init, the random baseline), finetune
(LoRA init, data order, dropout) and evaluate into ``OUT/seeds/seed_<s>/``. ``--full-pool`` adds the arm
trained on every ingested row at the same settings (about 10x the steps of a 10% selection). Prints the
table; ``selectmoe report demo output_dir=OUT`` then puts it on the report's first screen.

    PYTHONPATH=$PWD python benchmarks/demo_seeds.py --out outputs/demo --seeds 0 1 2 --full-pool
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


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


def seed_config(out: Path, seed: int, *, full_pool: bool, extra: list[str]):
    from selectmoe.config import load_config

    run = out / "seeds" / f"seed_{seed}"
    overrides = [
        f"output_dir={out}",
        f"seed={seed}",
        f"select.output_dir={run}/select",
        f"finetune.output_dir={run}/finetune",
        f"finetune.storage_path={run}/ray_results",
        f"evaluate.output_dir={run}/evaluate",
    ]
    if full_pool:
        overrides.append(f"finetune.train_files.full_pool={run}/full_pool.jsonl")
    return load_config("demo", [*overrides, *extra]), run


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
    configs = [seed_config(out, seed, full_pool=args.full_pool, extra=args.overrides) for seed in args.seeds]
    if not (Path(configs[0][0].score.output_dir) / "shards").is_dir():
        parser.error(
            f"{configs[0][0].score.output_dir}: no shards; run `selectmoe demo --out {args.out}` first"
        )

    from selectmoe.ray_utils import init_ray
    from selectmoe.report import DEMO_TASK, eval_arms, eval_verdict
    from selectmoe.stages.evaluate import run_evaluate
    from selectmoe.stages.finetune import run_finetune
    from selectmoe.stages.select import run_select

    init_ray(None)
    comparisons = []
    for seed, (cfg, run) in zip(args.seeds, configs, strict=True):
        t0 = time.perf_counter()
        run_select(cfg.select)
        if args.full_pool:
            write_full_pool(cfg.data.ingest_dir, run / "full_pool.jsonl")
        run_finetune(cfg.finetune)
        run_evaluate(cfg.evaluate)
        comparisons.append(json.loads((run / "evaluate" / "comparison.json").read_text()))
        print(f"seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)

    arms, n = eval_arms(comparisons, DEMO_TASK)
    print(f"\n{DEMO_TASK} accuracy over {n} seeds {args.seeds} (mean ± standard error):")
    print("| finetuned on | accuracy | per seed |\n|---|---|---|")
    for run, arm in arms.items():
        se = "" if arm["se"] is None else f" ± {arm['se']:.3f}"
        print(f"| {run} | {arm['mean']:.3f}{se} | {' '.join(f'{v:.3f}' for v in arm['values'])} |")
    print("\n" + eval_verdict(arms))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
