"""Shared body of the ``ray job submit`` entrypoints: parse ``--config`` + overrides, run stages."""

from __future__ import annotations

import argparse
import sys


def main(only: list[str] | None, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="YAML file or shipped preset name")
    parser.add_argument("--from", dest="start", default=None, help="start at this stage")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)

    from selectmoe.config import load_config
    from selectmoe.pipeline import run_pipeline

    cfg = load_config(args.config, args.overrides)
    run_pipeline(cfg, only=only, start=args.start, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main(None))
