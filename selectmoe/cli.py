"""``selectmoe`` command line: list, validate and run. Parses arguments and calls stage functions only.

selectmoe demo [--out DIR] [key=value ...]          the whole pipeline on the embedded tiny demo
selectmoe run CONFIG [key=value ...] [--only S ...] [--from S] [--force]
selectmoe {warmup,score,finetune,eval} CONFIG [key=value ...]   one stage of a config
selectmoe select (CONFIG | ROUTER_DIR | --batch ROOT) [key=value ...]
selectmoe validate FILE... --out DIR [--strict] [--format F]
selectmoe convert SRC_DIR DST_DIR [--gate-init-bias B] [--trash-expert-mode M]
selectmoe probe MODEL_DIR POOL [--n N]
selectmoe tune CONFIG [key=value ...]
selectmoe report (CONFIG [key=value ...] | ROUTER_DIR)
selectmoe config CONFIG [key=value ...]              print the resolved config
selectmoe presets                                    list shipped presets
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

STAGE_COMMANDS = {"warmup": "warmup", "score": "score", "finetune": "finetune", "eval": "evaluate"}


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a YAML file or a shipped preset name (see `selectmoe presets`)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. select.k_range=[10,40]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selectmoe", description="Select-MoE data selection on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the embedded tiny demo end to end (no download, CPU)")
    demo.add_argument("--out", default="outputs/demo", help="output directory (default outputs/demo)")
    demo.add_argument("overrides", nargs="*")
    demo.add_argument("--force", action="store_true", help="rerun stages even if complete")

    run = sub.add_parser("run", help="run the pipeline of a config")
    _config_args(run)
    run.add_argument("--only", nargs="+", metavar="STAGE", help="run only these stages")
    run.add_argument("--from", dest="start", metavar="STAGE", help="start at this stage")
    run.add_argument("--force", action="store_true", help="rerun stages even if complete")

    for name in STAGE_COMMANDS:
        p = sub.add_parser(name, help=f"run the {STAGE_COMMANDS[name]} stage of a config")
        _config_args(p)
        p.add_argument("--force", action="store_true")

    sel = sub.add_parser("select", help="selection from a config, a router-data dir, or --batch ROOT")
    sel.add_argument("rest", nargs=argparse.REMAINDER)

    val = sub.add_parser("validate", help="validate pool files; write rejected.jsonl + counts")
    val.add_argument("rest", nargs=argparse.REMAINDER)

    conv = sub.add_parser("convert", help="convert an OLMoE checkpoint to Select-MoE (verifies logits)")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--gate-init-bias", type=float, default=None)
    conv.add_argument("--gate-init-std", type=float, default=None)
    conv.add_argument("--trash-expert-mode", default=None, choices=["zero", "noise", "custom"])
    conv.add_argument("--no-verify", action="store_true")

    probe = sub.add_parser("probe", help="label-free quality probe AUC of a selector")
    probe.add_argument("rest", nargs=argparse.REMAINDER)

    tune = sub.add_parser("tune", help="Ray Tune sweep of the quality loss")
    _config_args(tune)

    rep = sub.add_parser("report", help="HTML/Markdown report of a run, or router-data analysis of a dir")
    rep.add_argument("target", help="a config/preset, or a router-data directory")
    rep.add_argument("overrides", nargs="*")
    rep.add_argument("--out", default=None, help="output dir for a router-data report")

    show = sub.add_parser("config", help="print the config as YAML to save and reuse (wiring unresolved)")
    _config_args(show)
    sub.add_parser("presets", help="list shipped presets")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return _dispatch(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"selectmoe: error: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    from selectmoe.config import list_presets, load_config

    cmd = args.command
    if cmd == "presets":
        print("\n".join(list_presets()))
        return 0
    if cmd == "config":
        from selectmoe.config import dump_config

        print(dump_config(args.config, args.overrides), end="")
        return 0
    if cmd == "demo":
        from selectmoe.pipeline import run_pipeline

        cfg = load_config("demo", [f"output_dir={args.out}", *args.overrides])
        run_pipeline(cfg, force=args.force)
        print(f"[selectmoe] report: {Path(cfg.output_dir) / 'report' / 'report.html'}")
        return 0
    if cmd == "run" or cmd in STAGE_COMMANDS:
        from selectmoe.pipeline import run_pipeline

        cfg = load_config(args.config, args.overrides)
        only = args.only if cmd == "run" else [STAGE_COMMANDS[cmd]]
        run_pipeline(cfg, only=only, start=getattr(args, "start", None), force=args.force)
        return 0
    if cmd == "select":
        return _select(args.rest)
    if cmd == "validate":
        from selectmoe.data.ingest import validate_main

        return validate_main(args.rest)
    if cmd == "convert":
        return _convert(args)
    if cmd == "probe":
        from selectmoe.probe import probe_main

        return probe_main(args.rest)
    if cmd == "tune":
        from selectmoe.ray_utils import init_ray
        from selectmoe.tune import run_tune

        cfg = load_config(args.config, args.overrides)
        init_ray(cfg.ray_address)
        result = run_tune(cfg)
        print(result)
        return 0
    if cmd == "report":
        return _report(args)
    raise AssertionError(cmd)


def _looks_like_config(arg: str) -> bool:
    from selectmoe.config import list_presets

    return arg.endswith((".yaml", ".yml")) or arg in list_presets()


def _select(rest: list[str]) -> int:
    if rest and _looks_like_config(rest[0]):
        from selectmoe.config import load_config
        from selectmoe.pipeline import run_pipeline

        run_pipeline(load_config(rest[0], rest[1:]), only=["select"], force="--force" in rest)
        return 0
    from selectmoe.stages.select import select_main

    return select_main(rest)


def _convert(args: argparse.Namespace) -> int:
    from selectmoe.config import ConvertConfig
    from selectmoe.model import convert_olmoe

    defaults = ConvertConfig()
    report = convert_olmoe(
        args.src,
        args.dst,
        gate_init_mean=defaults.gate_init_mean,
        gate_init_std=args.gate_init_std if args.gate_init_std is not None else defaults.gate_init_std,
        gate_init_bias=args.gate_init_bias if args.gate_init_bias is not None else defaults.gate_init_bias,
        trash_expert_mode=args.trash_expert_mode or defaults.trash_expert_mode,
        verify=not args.no_verify,
        atol=defaults.verify_atol,
    )
    print(report)
    return 0


def _report(args: argparse.Namespace) -> int:
    from selectmoe.report import build_router_report, build_run_report

    target = Path(args.target)
    if (target / "shards").is_dir():
        out = build_router_report(target, Path(args.out) if args.out else target / "report")
        print(f"[selectmoe] report: {out['html']}")
        return 0
    from selectmoe.config import load_config

    out = build_run_report(load_config(args.target, args.overrides))
    print(f"[selectmoe] report: {out['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
