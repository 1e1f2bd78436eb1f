"""``selectmoe`` command line: parses arguments and calls library functions, nothing else.

selectmoe demo [--out DIR] [--force] [key=value ...]     the whole pipeline on the embedded tiny demo
selectmoe run CONFIG [--only S ...] [--from S] [--force] [key=value ...]
selectmoe {warmup,score,finetune,evaluate} CONFIG [--force] [key=value ...]   one stage of a config
selectmoe select (CONFIG | ROUTER_DIR | --batch ROOT) [--pool-dir DIR] [--out DIR] [key=value ...]
selectmoe validate FILE... --out DIR [--strict] [--format F] [--max-chars N]
selectmoe convert SRC_DIR DST_DIR [--gate-init-bias B] [--trash-expert-mode M]
selectmoe probe MODEL_DIR POOL... [--n N] [--seed S]
selectmoe tune CONFIG [key=value ...]
selectmoe report (CONFIG [key=value ...] | ROUTER_DIR)
selectmoe config CONFIG [key=value ...]                   print the config
selectmoe presets                                         list shipped presets

``key=value`` overrides may stand anywhere after the command (also after ``--only a b``); ``-v`` before or
after the command. Only stdlib modules are imported until a command runs, so ``--help`` is instant.
Config mistakes print one or two lines naming the key (``selectmoe.config_errors``) and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

# A dotted override: key, optional .sub / [index] parts, then "=". No "/" in the key, so a path such as
# runs/lr=3e-4 is not one; a bare k=3 meant as an option value must be written ./k=3.
OVERRIDE = re.compile(r"^[A-Za-z_][\w-]*(?:\.[\w-]+|\[\d+\])*=")

Handler = Callable[[argparse.Namespace], int]


def split_overrides(tokens: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(arguments for argparse, key=value overrides)``, each in the order given."""
    overrides = [t for t in tokens if OVERRIDE.match(t)]
    return [t for t in tokens if not OVERRIDE.match(t)], overrides


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The whole CLI: one subparser per command, each listing every option it takes."""
    return _build()[0]


def _build() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser and its subparsers by command name (aliases included)."""
    # -v on every subparser too; SUPPRESS keeps a subparser from resetting a -v given before the command.
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log INFO")
    parser = argparse.ArgumentParser(prog="selectmoe", description="Select-MoE data selection on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log INFO")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, handler: Handler, text: str, *, aliases: Sequence[str] = ()
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, aliases=list(aliases), help=text, description=text, parents=[verbose])
        p.set_defaults(handler=handler, command=name)
        return p

    demo = add("demo", _cmd_demo, "run the embedded tiny demo end to end (no download, CPU)")
    demo.add_argument("--out", default="outputs/demo", help="output directory (default: %(default)s)")
    _force(demo)
    _overrides(demo)

    run = add("run", _cmd_run, "run the pipeline of a config (skips stages that are complete)")
    _config(run)
    run.add_argument("--only", nargs="+", metavar="STAGE", help="run only these stages")
    run.add_argument("--from", dest="start", metavar="STAGE", help="start at this stage")
    _force(run)
    _overrides(run)

    for name, aliases in (("warmup", ()), ("score", ()), ("finetune", ()), ("evaluate", ("eval",))):
        p = add(name, _cmd_run, f"run the {name} stage of a config", aliases=aliases)
        _config(p)
        _force(p)
        _overrides(p, "pipeline overrides, e.g. warmup.epochs=1")

    sel = add("select", _cmd_select, "selection from a config, a router-data dir, or every one under ROOT")
    sel.add_argument(
        "target", nargs="?", metavar="CONFIG|ROUTER_DIR", help="a config/preset or a score output"
    )
    sel.add_argument(
        "--batch", metavar="ROOT", help="select for every score output under ROOT (skips complete)"
    )
    sel.add_argument("--pool-dir", help="ingested pool dir (default: from ROUTER_DIR/_manifest.json)")
    sel.add_argument("--out", help="output dir (default: ROUTER_DIR/selection)")
    _force(sel)
    _overrides(sel, "select.* overrides with a config; SelectConfig keys (k=3) with a router-data dir")

    val = add(
        "validate", _cmd_validate, "validate pool files: rejected.jsonl, flagged.jsonl, counts per reason"
    )
    val.add_argument("files", nargs="+", metavar="FILE", help="pool files, directories, globs or URIs")
    val.add_argument("--out", required=True, help="directory for rejected.jsonl / flagged.jsonl")
    val.add_argument("--strict", action="store_true", help="fail (exit 2) at the first bad row")
    val.add_argument(
        "--format", dest="fmt", default=argparse.SUPPRESS, help="auto | messages | sharegpt | alpaca"
    )
    val.add_argument("--max-chars", type=int, default=argparse.SUPPRESS, help="longer rows are rejected")

    conv = add("convert", _cmd_convert, "convert an OLMoE checkpoint to Select-MoE (verifies logits)")
    conv.add_argument("src", help="OLMoE checkpoint directory (HF format)")
    conv.add_argument("dst", help="output directory")
    conv.add_argument("--gate-init-bias", type=float, default=None, help="default: convert.gate_init_bias")
    conv.add_argument("--gate-init-std", type=float, default=None, help="default: convert.gate_init_std")
    conv.add_argument("--trash-expert-mode", default=None, choices=["zero", "noise", "custom"])
    conv.add_argument("--no-verify", action="store_true", help="skip the logits check")

    probe = add("probe", _cmd_probe, "label-free quality probe AUC of a selector (clean vs corrupted twins)")
    probe.add_argument("model_dir", help="a selector artefact or a converted Select-MoE directory")
    probe.add_argument("pool", nargs="+", help="instruction files (any format ingest accepts)")
    probe.add_argument("--n", type=int, default=argparse.SUPPRESS, help="clean samples drawn (default 64)")
    probe.add_argument("--seed", type=int, default=argparse.SUPPRESS, help="sampling seed (default 42)")
    probe.add_argument("--batch-size", type=int, default=argparse.SUPPRESS, help="samples per forward")
    probe.add_argument("--format", dest="fmt", default=argparse.SUPPRESS, help="pool format (default auto)")

    tune = add("tune", _cmd_tune, "Ray Tune sweep of the quality loss (metric: probe AUC)")
    _config(tune)
    _overrides(tune)

    rep = add("report", _cmd_report, "HTML/Markdown report of a run, or router-data analysis of a dir")
    rep.add_argument(
        "target", metavar="CONFIG|ROUTER_DIR", help="a config/preset, or a router-data directory"
    )
    rep.add_argument("--out", default=None, help="output dir for a router-data report (default: DIR/report)")
    _overrides(rep)

    show = add("config", _cmd_config, "print the config as YAML to save and reuse (wiring unresolved)")
    _config(show)
    _overrides(show)
    add("presets", _cmd_presets, "list shipped presets")
    return parser, sub.choices


def _config(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a YAML file or a shipped preset name (see `selectmoe presets`)")


def _force(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="rerun stages even if complete")


def _overrides(
    p: argparse.ArgumentParser, text: str = "dotted overrides, e.g. select.k_range=[10,40]"
) -> None:
    """Documents the overrides; :func:`parse_args` takes them out before argparse sees the line, so what
    argparse still puts here is a stray argument."""
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"{text}; anywhere after the command")
    p.set_defaults(takes_overrides=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a command line; ``key=value`` tokens after a command that takes overrides go to ``overrides``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = _build()
    # The top-level parser has flags only (-v, -h): the first other token is the command.
    command_at = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    head, tail = argv[: command_at + 1], argv[command_at + 1 :]
    sub = commands.get(head[-1]) if head else None
    if sub is None or not sub.get_default("takes_overrides"):
        return parser.parse_args(argv)
    rest, overrides = split_overrides(tail)
    args = parser.parse_args([*head, *rest])
    if args.overrides:
        sub.error(f"unrecognized arguments: {' '.join(args.overrides)} (overrides are key=value)")
    args.overrides = overrides
    return args


# --------------------------------------------------------------------------- entry point
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.handler(args)
    except Exception as exc:
        message = _config_mistake(exc, args)
        if message is None:
            if not isinstance(exc, (FileNotFoundError, ValueError)):
                raise
            message = str(exc)
        print(f"selectmoe {args.command}: error: {message}", file=sys.stderr)
        return 2


def _config_mistake(exc: Exception, args: argparse.Namespace) -> str | None:
    from selectmoe.config import list_presets
    from selectmoe.config_errors import explain

    source = getattr(args, "config", None) or getattr(args, "target", None)
    return explain(exc, source=source, overrides=getattr(args, "overrides", ()), presets=list_presets())


# --------------------------------------------------------------------------- commands
def _given(args: argparse.Namespace, *names: str) -> dict[str, object]:
    """The optional arguments the user gave (SUPPRESS defaults): the library function keeps its defaults."""
    return {n: getattr(args, n) for n in names if hasattr(args, n)}


def _cmd_presets(args: argparse.Namespace) -> int:
    from selectmoe.config import list_presets

    print("\n".join(list_presets()))
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from selectmoe.config import dump_config

    print(dump_config(args.config, args.overrides), end="")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from selectmoe.config import load_config
    from selectmoe.pipeline import run_pipeline

    cfg = load_config("demo", [f"output_dir={args.out}", *args.overrides])
    run_pipeline(cfg, force=args.force)
    print(f"[selectmoe] report: {Path(cfg.output_dir) / 'report' / 'report.html'}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    """``run`` (all planned stages, or --only / --from) and the one-stage commands."""
    from selectmoe.config import load_config
    from selectmoe.pipeline import run_pipeline

    cfg = load_config(args.config, args.overrides)
    only = args.only if args.command == "run" else [args.command]
    run_pipeline(cfg, only=only, start=getattr(args, "start", None), force=args.force)
    return 0


def _cmd_select(args: argparse.Namespace) -> int:
    from selectmoe.config import list_presets

    if (args.target is None) == (args.batch is None):
        raise ValueError("give exactly one of CONFIG, ROUTER_DIR or --batch ROOT")
    if args.target is not None and (args.target.endswith((".yaml", ".yml")) or args.target in list_presets()):
        if args.pool_dir or args.out:
            raise ValueError("--pool-dir/--out apply to a ROUTER_DIR; with a config set select.pool_dir=...")
        from selectmoe.config import load_config
        from selectmoe.pipeline import run_pipeline

        run_pipeline(load_config(args.target, args.overrides), only=["select"], force=args.force)
        return 0
    from selectmoe.stages.select import select_main

    return select_main(
        args.target, batch=args.batch, pool_dir=args.pool_dir, out=args.out, overrides=args.overrides
    )


def _cmd_validate(args: argparse.Namespace) -> int:
    from selectmoe.data.ingest import validate_main

    return validate_main(args.files, args.out, strict=args.strict, **_given(args, "fmt", "max_chars"))


def _cmd_probe(args: argparse.Namespace) -> int:
    from selectmoe.probe import probe_main

    return probe_main(args.model_dir, args.pool, **_given(args, "n", "seed", "batch_size", "fmt"))


def _cmd_tune(args: argparse.Namespace) -> int:
    from selectmoe.config import load_config
    from selectmoe.ray_utils import init_ray
    from selectmoe.tune import run_tune

    cfg = load_config(args.config, args.overrides)
    init_ray(cfg.ray_address)
    print(run_tune(cfg))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
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


def _cmd_report(args: argparse.Namespace) -> int:
    from selectmoe.report import build_router_report, build_run_report

    target = Path(args.target)
    if (target / "shards").is_dir():
        if args.overrides:
            raise ValueError(
                f"overrides {args.overrides} apply to a config, not to the router-data dir {target}"
            )
        out = build_router_report(target, Path(args.out) if args.out else target / "report")
    else:
        from selectmoe.config import load_config

        out = build_run_report(load_config(args.target, args.overrides))
    print(f"[selectmoe] report: {out['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
