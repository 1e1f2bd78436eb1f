"""The driver: convert -> warmup -> score -> select -> finetune -> evaluate -> report, resumable.

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
from pathlib import Path
from typing import Any

from selectmoe.config import STAGES, PipelineConfig
from selectmoe.eval_tasks import check_eval_tasks_offline
from selectmoe.manifest import MANIFEST_NAME, config_hash, read_manifest, write_manifest
from selectmoe.ray_utils import init_ray

logger = logging.getLogger("selectmoe.pipeline")

# Which earlier stages each stage reads (its key includes their manifests).
UPSTREAM: dict[str, tuple[str, ...]] = {
    "demo": (),
    "ingest": ("demo",),
    "convert": ("demo",),
    "warmup": ("ingest", "convert"),
    "score": ("ingest", "warmup"),
    "select": ("ingest", "score"),
    "finetune": ("select", "demo"),
    "evaluate": ("finetune", "demo"),
    "report": ("ingest", "warmup", "score", "select", "evaluate"),
}


@dataclass
class StageOutcome:
    stage: str
    status: str  # ran | skipped
    wall_s: float
    summary: dict[str, Any] = field(default_factory=dict)


def stage_dir(cfg: PipelineConfig, stage: str) -> Path:
    return Path(
        {
            "demo": cfg.demo.dir,
            "ingest": cfg.data.ingest_dir,
            "convert": cfg.convert.output_dir,
            "warmup": cfg.warmup.output_dir,
            "score": cfg.score.output_dir,
            "select": cfg.select.output_dir,
            "finetune": cfg.finetune.output_dir,
            "evaluate": cfg.evaluate.output_dir,
            "report": f"{cfg.output_dir}/report",
        }[stage]
    )


def stage_config(cfg: PipelineConfig, stage: str) -> Any:
    return {
        "demo": cfg.demo,
        "ingest": cfg.data,
        "convert": cfg.convert,
        "warmup": cfg.warmup,
        "score": cfg.score,
        "select": cfg.select,
        "finetune": cfg.finetune,
        "evaluate": cfg.evaluate,
        "report": {"output_dir": cfg.output_dir},
    }[stage]


def planned_stages(cfg: PipelineConfig, only: list[str] | None = None, start: str | None = None) -> list[str]:
    stages = [s for s in STAGES if s in cfg.stages]
    if cfg.demo.enabled:
        stages = ["demo", *stages]
    if start is not None:
        if start not in stages:
            raise ValueError(f"--from {start}: not a planned stage ({stages})")
        stages = stages[stages.index(start) :]
    if only:
        unknown = [s for s in only if s not in (*STAGES, "demo")]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; stages are {['demo', *STAGES]}")
        stages = [s for s in stages if s in only]
    return stages


def _manifest_digest(directory: Path) -> str | None:
    manifest = read_manifest(directory)
    return None if manifest is None else config_hash(manifest)


def stage_key(cfg: PipelineConfig, stage: str) -> str:
    upstream = {u: _manifest_digest(stage_dir(cfg, u)) for u in UPSTREAM[stage] if _runs(cfg, u)}
    return config_hash({"stage": stage, "config": stage_config(cfg, stage), "upstream": upstream})


def _runs(cfg: PipelineConfig, stage: str) -> bool:
    return cfg.demo.enabled if stage == "demo" else stage in cfg.stages


def _record_path(cfg: PipelineConfig, stage: str) -> Path:
    return Path(cfg.output_dir) / "_pipeline" / f"{stage}.json"


def is_complete(cfg: PipelineConfig, stage: str) -> bool:
    record_path = _record_path(cfg, stage)
    if not record_path.is_file() or not (stage_dir(cfg, stage) / MANIFEST_NAME).is_file():
        return False
    record = json.loads(record_path.read_text())
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
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    outcomes: list[StageOutcome] = []
    ray_started = False
    for stage in stages:
        if not force and is_complete(cfg, stage):
            echo(f"[selectmoe] {stage:<9} skipped (complete, manifest matches)")
            outcomes.append(StageOutcome(stage, "skipped", 0.0))
            continue
        if stage in RAY_STAGES and not ray_started:
            init_ray(cfg.ray_address)
            ray_started = True
        key = stage_key(cfg, stage)  # before the stage: upstream manifests as they were read
        t0 = time.perf_counter()
        summary = RUNNERS[stage](cfg)
        wall = time.perf_counter() - t0
        out = stage_dir(cfg, stage)
        if read_manifest(out) is None:  # stages that have no manifest of their own get the driver's
            write_manifest(out, stage=stage, config=stage_config(cfg, stage), counts=summary, wall_s=wall)
        record = {"key": key, "manifest": _manifest_digest(out), "wall_s": round(wall, 3), "summary": summary}
        _record_path(cfg, stage).parent.mkdir(parents=True, exist_ok=True)
        _record_path(cfg, stage).write_text(json.dumps(record, indent=2, default=str) + "\n")
        echo(f"[selectmoe] {stage:<9} done in {wall:7.1f} s  {_one_line(summary)}")
        outcomes.append(StageOutcome(stage, "ran", wall, summary))
    return outcomes


def _one_line(summary: dict[str, Any]) -> str:
    items = [f"{k}={v}" for k, v in summary.items() if isinstance(v, (int, float, str)) and len(str(v)) < 40]
    return " ".join(items[:6])


# --- stage adapters: parse nothing, call the stage's run function, return a small summary ----------


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


def _run_demo(cfg: PipelineConfig) -> dict[str, Any]:
    from selectmoe.demo import prepare_demo_assets

    return _summary(prepare_demo_assets(cfg.demo, seed=cfg.seed))


def _run_ingest(cfg: PipelineConfig) -> dict[str, Any]:
    from selectmoe.data.ingest import ingest_pool

    if not cfg.data.pool:
        raise ValueError("data.pool is empty: give the pool files, e.g. data.pool=[path/to/pool.jsonl]")
    return _summary(
        ingest_pool(cfg.data.pool, cfg.data.ingest_dir, fmt=cfg.data.format, strict=cfg.data.strict)
    )


def _run_convert(cfg: PipelineConfig) -> dict[str, Any]:
    from selectmoe.model import convert_olmoe

    c = cfg.convert
    report = convert_olmoe(
        c.source,
        c.output_dir,
        gate_init_mean=c.gate_init_mean,
        gate_init_std=c.gate_init_std,
        gate_init_bias=c.gate_init_bias,
        trash_expert_mode=c.trash_expert_mode,
        verify=c.verify_logits,
        atol=c.verify_atol,
    )
    return _summary(report)


def _run_warmup(cfg: PipelineConfig) -> dict[str, Any]:
    from selectmoe.stages.warmup import run_warmup

    return _summary(run_warmup(cfg.warmup))


def _run_score(cfg: PipelineConfig) -> dict[str, Any]:
    from selectmoe.stages.score import run_score

    return _summary(run_score(cfg.score))


def _run_select(cfg: PipelineConfig) -> dict[str, Any]:
    from selectmoe.stages.select import run_select

    return _summary(run_select(cfg.select))


def _run_finetune(cfg: PipelineConfig) -> dict[str, Any]:
    from selectmoe.stages.finetune import run_finetune

    return _summary(run_finetune(cfg.finetune))


def _run_evaluate(cfg: PipelineConfig) -> dict[str, Any]:
    from selectmoe.stages.evaluate import run_evaluate

    return _summary(run_evaluate(cfg.evaluate))


def _run_report(cfg: PipelineConfig) -> dict[str, Any]:
    from selectmoe.report import build_run_report

    return _summary(build_run_report(cfg))


RUNNERS: dict[str, Callable[[PipelineConfig], dict[str, Any]]] = {
    "demo": _run_demo,
    "ingest": _run_ingest,
    "convert": _run_convert,
    "warmup": _run_warmup,
    "score": _run_score,
    "select": _run_select,
    "finetune": _run_finetune,
    "evaluate": _run_evaluate,
    "report": _run_report,
}
RAY_STAGES = {"warmup", "score", "select", "finetune", "evaluate"}
