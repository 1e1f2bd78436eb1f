"""Ray Tune sweep of the quality loss as a Ray job.

ray job submit --working-dir . -- python jobs/tune.py --config tune_quality_loss [key=value ...]
"""

import argparse
import os
import sys

# Repository root instead of jobs/ first on sys.path (jobs/select.py would shadow the stdlib `select`).
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    from selectmoe.config import load_config
    from selectmoe.pipeline import run_pipeline
    from selectmoe.ray_utils import init_ray
    from selectmoe.tune import run_tune

    cfg = load_config(args.config, args.overrides)
    run_pipeline(cfg)  # the stages the tune preset lists (demo assets, ingest, convert): skipped if done
    init_ray(cfg.ray_address)
    print(run_tune(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
