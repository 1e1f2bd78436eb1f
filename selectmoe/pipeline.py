"""The driver: the stages of :data:`selectmoe.stages.contract.STAGE_TABLE` in order, resumable.

Before Ray starts or any directory is created, the declared inputs of every stage that will run are
checked (those an earlier stage of the run produces excepted): a missing one fails in one line naming the
stage, the input and how to produce it.

Skip rule: a stage is complete when its output directory holds a ``_manifest.json`` and the pipeline's
record for it (``<output_dir>/_pipeline/<stage>.json``) carries the same *stage key*: a hash of the
stage's config and of the manifests of the stages it reads. Rerunning a finished run therefore does no
work; deleting one stage's outputs reruns that stage, and since its new manifest differs, everything
downstream of it. A partial stage is rerun and resumes by itself (scoring skips finished shards,
warmup/finetune restart from their last checkpoint).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from selectmoe import storage
from selectmoe.code_version import code_version
from selectmoe.config import PipelineConfig
from selectmoe.cpu_isa import cpu_isa_level
from selectmoe.eval_tasks import check_eval_tasks_offline
from selectmoe.manifest import MANIFEST_NAME, config_hash, read_manifest, write_manifest
from selectmoe.ray_utils import init_ray
from selectmoe.stages.contract import STAGE_TABLE, STAGES_BY_NAME, missing_inputs

logger = logging.getLogger("selectmoe.pipeline")


@dataclass
class StageOutcome:
    stage: str
    status: str  # ran | skipped
    wall_s: float
    summary: dict[str, Any] = field(default_factory=dict)


def stage_dir(cfg: PipelineConfig, stage: str) -> str:
    """A stage's output directory: a local path or a URI (read through :mod:`selectmoe.storage`)."""
    spec = STAGES_BY_NAME[stage]
    return str(spec.output(spec.section(cfg)))


def _stage_config(cfg: PipelineConfig, stage: str) -> Any:
    """What enters the stage key: its config section (the report: only the run's directory)."""
    spec = STAGES_BY_NAME[stage]
    return {"output_dir": cfg.output_dir} if spec.config is None else spec.section(cfg)


def planned_stages(cfg: PipelineConfig, only: list[str] | None = None, start: str | None = None) -> list[str]:
    """The stages a run executes, in table order: ``cfg.stages`` (+ ``demo`` when enabled), cut by
    ``--from`` and ``--only``."""
    names = [s.name for s in STAGE_TABLE]
    stages = [n for n in names if _runs(cfg, n)]
    if start is not None:
        if start not in stages:
            raise ValueError(f"--from {start}: not a planned stage ({stages})")
        stages = stages[stages.index(start) :]
    if only:
        unknown = [s for s in only if s not in names]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; stages are {names}")
        stages = [s for s in stages if s in only]
    return stages


def _manifest_digest(directory: str) -> str | None:
    manifest = read_manifest(directory)
    return None if manifest is None else config_hash(manifest)


def stage_key(cfg: PipelineConfig, stage: str) -> str:
    upstream = {
        u: _manifest_digest(stage_dir(cfg, u)) for u in STAGES_BY_NAME[stage].upstream if _runs(cfg, u)
    }
    code = code_version(STAGES_BY_NAME[stage].runner.split(":")[0])
    return config_hash(
        {
            "stage": stage,
            "config": _stage_config(cfg, stage),
            "upstream": upstream,
            "code": code,
            "cpu_isa": cpu_isa_level(),  # results differ per kernel level (selectmoe.cpu_isa)
        }
    )


def _runs(cfg: PipelineConfig, stage: str) -> bool:
    return cfg.demo.enabled if stage == "demo" else stage in cfg.stages


def _record_path(cfg: PipelineConfig, stage: str) -> str:
    return storage.join(cfg.output_dir, "_pipeline", f"{stage}.json")


def is_complete(cfg: PipelineConfig, stage: str) -> bool:
    record_path = _record_path(cfg, stage)
    if not storage.is_file(record_path) or not storage.is_file(
        storage.join(stage_dir(cfg, stage), MANIFEST_NAME)
    ):
        return False
    record = json.loads(storage.read_text(record_path))
    return record.get("key") == stage_key(cfg, stage) and record.get("manifest") == _manifest_digest(
        stage_dir(cfg, stage)
    )


def run_pipeline(
    cfg: PipelineConfig,
    *,
    only: list[str] | None = None,
    start: str | None = None,
    force: bool = False,
    echo: Callable[[str], None] = print,
) -> list[StageOutcome]:
    """Run the planned stages in order; returns one outcome per stage (ran or skipped)."""
    stages = planned_stages(cfg, only, start)
    if "evaluate" in stages:
        check_eval_tasks_offline(cfg)  # before any training: a task that would download fails now
    to_run = stages_to_run(cfg, stages, force=force)
    check_planned_inputs(cfg, stages, to_run)  # before Ray and before any directory is created
    storage.makedirs(cfg.output_dir)
    outcomes: list[StageOutcome] = []
    ray_started = False
    for stage in stages:
        if not force and is_complete(cfg, stage):
            echo(f"[selectmoe] {stage:<9} skipped (complete, manifest matches)")
            outcomes.append(StageOutcome(stage, "skipped", 0.0))
            continue
        if STAGES_BY_NAME[stage].needs_ray and not ray_started:
            init_ray(cfg.ray_address)
            ray_started = True
        key = stage_key(cfg, stage)  # before the stage: upstream manifests as they were read
        t0 = time.perf_counter()
        summary = _summary(STAGES_BY_NAME[stage].run(cfg))
        wall = time.perf_counter() - t0
        out = stage_dir(cfg, stage)
        if read_manifest(out) is None:  # stages that have no manifest of their own get the driver's
            write_manifest(out, stage=stage, config=_stage_config(cfg, stage), counts=summary, wall_s=wall)
        record = {"key": key, "manifest": _manifest_digest(out), "wall_s": round(wall, 3), "summary": summary}
        storage.write_text(_record_path(cfg, stage), json.dumps(record, indent=2, default=str) + "\n")
        echo(f"[selectmoe] {stage:<9} done in {wall:7.1f} s  {_one_line(summary)}")
        outcomes.append(StageOutcome(stage, "ran", wall, summary))
    return outcomes


def _one_line(summary: dict[str, Any]) -> str:
    items = [f"{k}={v}" for k, v in summary.items() if isinstance(v, (int, float, str)) and len(str(v)) < 40]
    return " ".join(items[:6])


def stages_to_run(cfg: PipelineConfig, stages: list[str], *, force: bool = False) -> set[str]:
    """The planned stages that will run: incomplete ones, and those reading one that runs (its manifest
    changes, so their key does)."""
    runs: set[str] = set()
    for stage in stages:
        if force or not is_complete(cfg, stage) or runs & set(STAGES_BY_NAME[stage].upstream):
            runs.add(stage)
    return runs


def check_planned_inputs(cfg: PipelineConfig, stages: list[str], to_run: set[str]) -> None:
    """``FileNotFoundError`` naming the first stage that would start without a declared input (one that
    exists neither now nor under the output dir of an earlier stage that runs)."""
    produced: list[str] = []
    for stage in stages:
        if stage in to_run:
            problems = missing_inputs(stage, STAGES_BY_NAME[stage].section(cfg), produced)
            if problems:
                raise FileNotFoundError("; ".join(problems))
        produced.append(str(stage_dir(cfg, stage)))


def _summary(result: Any) -> dict[str, Any]:
    if hasattr(result, "summary") and callable(result.summary):
        return dict(result.summary())
    if hasattr(result, "__dataclass_fields__"):
        import dataclasses

        return {
            k: v
            for k, v in dataclasses.asdict(result).items()
            if isinstance(v, (int, float, str, bool)) or v is None
        }
    return dict(result) if isinstance(result, dict) else {}
