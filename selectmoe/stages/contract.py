"""The stage contract: one table of stages, each ``selectmoe/stages/<name>.py: run_<name>(cfg) -> <Name>Result``.

Each row says where a stage's config lives in :class:`PipelineConfig`, where it writes, which inputs it
reads (and which stage produces them), which stages' manifests enter its key, whether it needs Ray and
which function runs it. :mod:`selectmoe.pipeline` is driven by this table; every ``run_<name>`` calls
:func:`check_inputs` first, so a stage started without its inputs fails in one line, before Ray starts and
before it creates any directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selectmoe import storage
from selectmoe.config import PipelineConfig

SHARDS = "shards"  # the sub-directory that makes an ingest or router-data dir readable


@dataclass(frozen=True)
class Input:
    """One declared input of a stage: the config key naming it, its path, and what makes it present."""

    key: str  # the config key, e.g. "score.model_dir"
    path: str
    what: str  # "the warmup model"
    producer: str | None = None  # the stage that writes it; None: the user provides it
    child: str | None = None  # a sub-path that must exist too (e.g. "shards")
    hub_ok: bool = False  # a relative name that does not exist may be a Hugging Face hub id

    @property
    def where(self) -> str:
        return storage.join(self.path, self.child) if self.child else self.path

    def present(self) -> bool:
        if storage.is_uri(self.path):
            return storage.exists(self.where)
        path = Path(self.path).expanduser()
        if self.hub_ok and not path.is_absolute() and not path.exists():
            return (
                True  # a hub id (resolved from the local HF cache by the stage; nothing is downloaded here)
            )
        return (path / self.child).exists() if self.child else path.exists()

    def problem(self, stage: str) -> str:
        how = f"run: selectmoe run CONFIG --only {self.producer}" if self.producer else f"set {self.key}"
        return f"{stage}: needs {self.what} at {self.where} ({how})"


@dataclass(frozen=True)
class Stage:
    name: str
    config: str | None  # the PipelineConfig attribute run_<name> takes; None: the whole PipelineConfig
    output: Callable[[Any], str]  # its output dir, from its config
    inputs: Callable[[Any], list[Input]]  # its declared inputs, from its config
    upstream: tuple[str, ...]  # stages whose manifests enter its key
    needs_ray: bool
    runner: str  # "module:function"
    seeded: bool = False  # run_<name> also takes the run's ``seed`` (the demo: its config has none)
    # Input keys the stage reads from shared storage itself, on whichever node needs them (its Ray workers
    # stage models through selectmoe.storage.local_copy, Ray Data reads shards by URI); other URI inputs
    # are staged on the driver's node (on_local_disk).
    reads_uris: tuple[str, ...] = ()

    def section(self, cfg: PipelineConfig) -> Any:
        return cfg if self.config is None else getattr(cfg, self.config)

    def run(self, cfg: PipelineConfig) -> Any:
        """Run the stage; on shared storage (URIs) through node-local copies (:func:`on_local_disk`)."""
        module, func = self.runner.split(":")
        kwargs = {"seed": cfg.seed} if self.seeded else {}
        with on_local_disk(self, self.section(cfg)) as section:
            return getattr(importlib.import_module(module), func)(section, **kwargs)


def _ingested(key: str, path: str) -> Input:
    return Input(key, path, "the ingested pool", "ingest", child=SHARDS)


def _pool_inputs(c: Any) -> list[Input]:
    if not c.pool:
        raise ValueError("data.pool is empty: give the pool files, e.g. data.pool=[path/to/pool.jsonl]")
    paths = [str(p).split("#dataset=", 1)[0] for p in c.pool]  # ``path#dataset=NAME`` names a dataset
    local = [p for p in paths if "://" not in p and not any(ch in p for ch in "*?[")]  # URIs, globs: ingest
    return [Input("data.pool", p, "the pool file") for p in local]


def _finetune_inputs(c: Any) -> list[Input]:
    files = [
        Input(f"finetune.train_files.{name}", str(p), "the selection", "select")
        for name, p in c.train_files.items()
    ]
    return [Input("finetune.base_model", str(c.base_model), "the base model", hub_ok=True), *files]


def _target_inputs(specs: list[str]) -> list[Input]:
    """The local files/dirs ``select.target`` names (eval tasks without a path read packaged data)."""
    from selectmoe.selection.targets import DEMO_TARGET, EVAL_TARGETS

    out = []
    for spec in specs:
        name, _, arg = str(spec).partition("=")
        path = arg if name in EVAL_TARGETS else str(spec)
        if path and "://" not in path:
            producer = "demo" if name == DEMO_TARGET else None
            out.append(Input("select.target", path, f"the target examples {spec!r}", producer))
    return out


STAGE_TABLE: tuple[Stage, ...] = (
    Stage("demo", "demo", lambda c: c.dir, lambda c: [], (), False, "selectmoe.stages.demo:run_demo", seeded=True),
    Stage("ingest", "data", lambda c: c.ingest_dir, _pool_inputs, ("demo",), False, "selectmoe.stages.ingest:run_ingest"),
    Stage(
        "convert", "convert", lambda c: c.output_dir,
        lambda c: [Input("convert.source", str(c.source), "the OLMoE checkpoint", hub_ok=True)],
        ("demo",), False, "selectmoe.stages.convert:run_convert",
    ),
    Stage(
        "warmup", "warmup", lambda c: c.output_dir,
        lambda c: [
            Input("warmup.model_dir", str(c.model_dir), "the converted model", "convert"),
            _ingested("warmup.ingest_dir", c.ingest_dir),
        ],
        ("ingest", "convert"), True, "selectmoe.stages.warmup:run_warmup", reads_uris=("model_dir", "ingest_dir"),
    ),
    Stage(
        "score", "score", lambda c: c.output_dir,
        lambda c: [
            Input("score.model_dir", str(c.model_dir), "the warmup model", "warmup"),
            _ingested("score.ingest_dir", c.ingest_dir),
        ],
        ("ingest", "warmup"), True, "selectmoe.stages.score:run_score", reads_uris=("model_dir", "ingest_dir"),
    ),
    Stage(
        "select", "select", lambda c: c.output_dir,
        lambda c: [
            Input("select.router_dir", str(c.router_dir), "the router data", "score", child=SHARDS),
            _ingested("select.pool_dir", c.pool_dir),
            *_target_inputs(c.target),
        ],
        ("ingest", "score"), True, "selectmoe.stages.select:run_select",
    ),
    Stage(
        "finetune", "finetune", lambda c: c.output_dir, _finetune_inputs,
        ("select", "demo"), True, "selectmoe.stages.finetune:run_finetune",
        reads_uris=("base_model", "train_files"),
    ),
    Stage(
        "evaluate", "evaluate", lambda c: c.output_dir,
        lambda c: [
            Input("evaluate.base_model", str(c.base_model), "the base model", hub_ok=True),
            *([Input("evaluate.adapters_dir", str(c.adapters_dir), "the finetuned adapters", "finetune")]
              if c.adapters_dir else []),
        ],
        ("finetune", "demo"), True, "selectmoe.stages.evaluate:run_evaluate",
    ),
    Stage(
        "report", None, lambda c: f"{c.output_dir}/report", lambda c: [],
        ("ingest", "warmup", "score", "select", "evaluate"), False, "selectmoe.stages.report:run_report",
    ),
)  # fmt: skip
STAGES_BY_NAME: dict[str, Stage] = {s.name: s for s in STAGE_TABLE}


def missing_inputs(stage: str, section: Any, produced: Sequence[str] = ()) -> list[str]:
    """One line per declared input of ``stage`` (config ``section``) that is absent and not under one of
    the ``produced`` directories (outputs of stages that run before it)."""
    roots = [str(p).rstrip("/") for p in produced]

    def covered(path: str) -> bool:
        return any(path == r or path.startswith(r + "/") for r in roots)

    return [
        i.problem(stage)
        for i in STAGES_BY_NAME[stage].inputs(section)
        if not covered(i.path) and not i.present()
    ]


@contextlib.contextmanager
def on_local_disk(stage: Stage, section: Any) -> Iterator[Any]:
    """The stage's config section with its URI inputs staged to node-local copies
    (:func:`selectmoe.storage.local_copy`) and its URI output directory replaced by a local scratch
    directory, uploaded to the URI when the stage returns (a failed stage uploads nothing: the run's record
    of it stays absent, so a rerun runs it again). Local paths pass unchanged, so a run on local disk or
    NFS is exactly what it was. The stage's manifest is written into the scratch directory and uploaded
    with its outputs; its config (what the pipeline's stage key hashes) is the section as given, URIs."""
    if stage.config is None or not dataclasses.is_dataclass(section):
        yield section
        return
    out_key = next((f.name for f in dataclasses.fields(section)
                    if getattr(section, f.name) == stage.output(section)), None)  # fmt: skip
    changes: dict[str, Any] = {}
    for inp in stage.inputs(section):
        field, *sub = inp.key.split(".", 2)[1:]
        if storage.is_uri(inp.path) and field not in stage.reads_uris and storage.exists(inp.path):
            if sub:  # a mapping entry, e.g. finetune.train_files.selected
                mapping = dict(changes.get(field, getattr(section, field)))
                mapping[sub[0]] = storage.local_copy(inp.path)
                changes[field] = mapping
            else:
                changes[field] = storage.local_copy(inp.path)
    with contextlib.ExitStack() as stack:
        if out_key is not None and storage.is_uri(getattr(section, out_key)):
            changes[out_key] = str(stack.enter_context(storage.local_output(getattr(section, out_key))))
        yield dataclasses.replace(section, **changes) if changes else section


def check_inputs(stage: str, section: Any) -> None:
    """Raise ``FileNotFoundError`` (one line per missing input) when ``stage`` cannot start."""
    problems = missing_inputs(stage, section)
    if problems:
        raise FileNotFoundError("; ".join(problems))
