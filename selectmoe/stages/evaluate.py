"""Stage 4b: lm-eval on the base model and on every fine-tuned LoRA adapter, the LESS protocol offline.

Runs: ``base`` (when ``include_base``) and one per ``<adapters_dir>/<name>/adapter`` (the names the
finetune manifest lists, else every such directory). Each adapter is checked first (files present,
``adapter_config.json``'s base model = ``base_model``, every LoRA tensor's shape fits the base
architecture) and a bad one is an :class:`AdapterError` naming its path -- before any evaluation starts.

Tasks: the LESS evaluations (``mmlu``, ``bbh_cot_fewshot``, ``tydiqa_goldp`` and their subtasks) are
written from the shipped templates into ``output_dir/tasks`` with the data of ``mmlu_data`` /
``bbh_data`` / ``tydiqa_data`` (:func:`selectmoe.eval_tasks.write_less_tasks`), ahead of
``include_path``; then every task must resolve to local files, else an ``EvalTaskError`` names the key to
set (the pipeline runs the same check before any training). Few-shot counts come from the task YAMLs
(MMLU 5, BBH 3, TyDiQA 1); ``num_fewshot`` only overrides them (exact task name, else the longest key
that prefixes it as ``<key>_...``): lm-eval takes one ``num_fewshot`` per ``simple_evaluate`` call, so
the tasks are grouped by override.

Per run, one lm-eval ``HFLM(pretrained=base_model, peft=adapter_dir, dtype=...)`` is built and
``lm_eval.simple_evaluate`` is called once per few-shot group.

Outputs: ``output_dir/<run>/results.json`` (lm-eval's results, merged over the calls, JSON-safe, plus the
model args), ``output_dir/<run>/per_question.json`` (``{task: {"doc_id": [...], "acc": [...]}}``: each
question's score, for paired comparisons of runs, :mod:`selectmoe.evaluation.paired`),
``output_dir/comparison.json`` = ``{"runs": {run: {task: {metric: value}}}, "rows": [...]}``
(``rows``: one flat row per run for the report table) and ``comparison.md``.

Where it runs: when the Ray cluster has GPUs (and ``device`` is ``auto``/``cuda``), one Ray task per run
with ``num_gpus=num_gpus_per_replica``, all runs in parallel (lm-eval's HF backend uses one device per process;
data-parallel lm-eval needs ``accelerate launch``, while independent runs parallelise for free). The task
dirs in ``include_path`` and the model/adapter paths must then be visible on every node (shared storage).
Without GPUs the runs go sequentially in this process: CPU evaluation is bound by torch's intra-op threads
already, and a second process would only compete for the same cores.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selectmoe.config import EvaluateConfig
from selectmoe.eval_tasks import check_tasks_offline, stage_task_dirs, write_less_tasks
from selectmoe.manifest import jsonable, write_manifest
from selectmoe.markdown import markdown_table
from selectmoe.stages.contract import check_inputs

logger = logging.getLogger(__name__)

BASE_RUN = "base"
PER_QUESTION = "per_question"  # results key and <run>/per_question.json: each question's score
ADAPTER_DIR = "adapter"
_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_CONFIG_IGNORE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures"}


class AdapterError(ValueError):
    """A missing or incompatible LoRA adapter (the message names its path)."""


@dataclass
class EvaluateResult:
    output_dir: str
    runs: dict[str, dict[str, dict[str, float]]]  # run -> task -> metric -> value
    results_paths: dict[str, str]
    mode: str  # "ray-gpu" | "in-process"
    wall_s: float

    def summary(self) -> dict[str, Any]:
        return {"mode": self.mode, "runs": self.runs, "wall_s": round(self.wall_s, 1)}


# ------------------------------------------------------------------------------------------ few-shot


def fewshot_for(task: str, table: Mapping[str, int]) -> int | None:
    """The pinned few-shot count of ``task``: exact name, else the longest ``<key>_`` prefix, else None."""
    if task in table:
        return int(table[task])
    keys = [k for k in table if task.startswith(f"{k}_")]
    return int(table[max(keys, key=len)]) if keys else None


def group_by_fewshot(tasks: list[str], table: Mapping[str, int]) -> dict[int | None, list[str]]:
    groups: dict[int | None, list[str]] = {}
    for task in tasks:
        groups.setdefault(fewshot_for(task, table), []).append(task)
    return groups


# ------------------------------------------------------------------------------------------ adapters


def _resolve(path: str) -> str:
    return os.path.realpath(path) if os.path.exists(path) else path


def _model_config(path: str) -> dict[str, Any] | None:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    return {k: v for k, v in json.loads(cfg.read_text()).items() if k not in _CONFIG_IGNORE}


def same_base(a: str, b: str) -> bool:
    """Same base model: same name/path, or two directories with the same ``config.json``."""
    if a == b or _resolve(a) == _resolve(b):
        return True
    ca, cb = _model_config(a), _model_config(b)
    return ca is not None and ca == cb


def check_adapter(adapter_dir: str | Path, base_model: str) -> dict[str, Any]:
    """Validate a peft LoRA adapter against ``base_model``; returns its ``adapter_config.json``.

    Raises :class:`AdapterError` naming the path when files are missing, the adapter was trained on
    another base, or a LoRA tensor's shape does not fit the base architecture.
    """
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    if not adapter_dir.is_dir():
        raise AdapterError(f"adapter directory {adapter_dir} does not exist (did the finetune run finish?)")
    if not cfg_path.is_file():
        raise AdapterError(f"{adapter_dir} is not a peft adapter: no adapter_config.json")
    weights = [adapter_dir / f for f in _WEIGHT_FILES if (adapter_dir / f).is_file()]
    if not weights:
        raise AdapterError(f"{adapter_dir} has no adapter weights ({' or '.join(_WEIGHT_FILES)})")
    adapter_cfg = json.loads(cfg_path.read_text())
    trained_on = adapter_cfg.get("base_model_name_or_path")
    if trained_on and not same_base(str(trained_on), str(base_model)):
        raise AdapterError(
            f"adapter {adapter_dir} was trained on base model {trained_on!r}, but evaluate.base_model is "
            f"{base_model!r} (a different model: config.json differs)"
        )
    if weights[0].suffix != ".safetensors":
        return adapter_cfg  # shapes are checked by peft at load time
    config = AutoConfig.from_pretrained(base_model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    problems = []
    with safe_open(str(weights[0]), framework="pt") as fh:
        for key in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
            shape = tuple(fh.get_slice(key).get_shape())
            name = key.removeprefix("base_model.model.")
            for part in ("lora_A", "lora_B"):
                if f".{part}." in name:
                    module = modules.get(name.split(f".{part}.")[0])
                    if module is None or not hasattr(module, "in_features"):
                        problems.append(f"{key}: no linear layer {name.split(f'.{part}.')[0]!r} in the base")
                    elif part == "lora_A" and shape[1] != module.in_features:
                        problems.append(f"{key}: shape {shape}, base in_features {module.in_features}")
                    elif part == "lora_B" and shape[0] != module.out_features:
                        problems.append(f"{key}: shape {shape}, base out_features {module.out_features}")
                    break
            else:
                param = params.get(name)
                if param is not None and tuple(param.shape) != shape:
                    problems.append(f"{key}: shape {shape}, base {tuple(param.shape)}")
    if problems:
        raise AdapterError(
            f"adapter {adapter_dir} does not fit base model {base_model!r} ({len(problems)} tensor(s)): "
            + "; ".join(problems[:5])
        )
    return adapter_cfg


def discover_runs(cfg: EvaluateConfig) -> dict[str, str | None]:
    """``{run: adapter_dir or None (the base)}``; raises :class:`AdapterError` for a missing adapter."""
    runs: dict[str, str | None] = {BASE_RUN: None} if cfg.include_base else {}
    root = Path(cfg.adapters_dir) if cfg.adapters_dir else None
    if root is not None:
        if not root.is_dir():
            raise AdapterError(f"evaluate.adapters_dir {root} does not exist (run the finetune stage first)")
        names: list[str] = []
        manifest = root / "_manifest.json"
        if manifest.is_file():
            names = list((json.loads(manifest.read_text()).get("extra") or {}).get("runs") or {})
        if not names:
            names = sorted(
                p.name
                for p in root.iterdir()
                if p.is_dir() and ((p / ADAPTER_DIR).exists() or (p / "_manifest.json").exists())
            )
        for name in names:
            if name in runs:
                raise ValueError(
                    f"adapter run name {name!r} clashes with the base run; rename the finetune run"
                )
            adapter = root / name / ADAPTER_DIR
            if not (adapter / "adapter_config.json").is_file():
                raise AdapterError(f"missing adapter for run {name!r}: {adapter} (no adapter_config.json)")
            runs[name] = str(adapter)
    if not runs:
        raise AdapterError(f"nothing to evaluate: include_base is false and no <name>/adapter under {root}")
    return runs


# ------------------------------------------------------------------------------------------ lm-eval


def resolve_device(device: str) -> str:
    import torch

    if device in ("auto", "", None):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _merge(total: dict[str, Any], part: Mapping[str, Any]) -> None:
    for key, value in part.items():
        if isinstance(value, Mapping) and isinstance(total.get(key), dict):
            total[key].update(value)
        elif key not in total:
            total[key] = dict(value) if isinstance(value, Mapping) else value


def evaluate_model(
    base_model: str,
    adapter_dir: str | None,
    tasks: list[str],
    *,
    num_fewshot: Mapping[str, int],
    include_path: list[str],
    batch_size: int | str = 8,
    limit: int | float | None = None,
    device: str = "auto",
    seed: int = 1234,
    include_defaults: bool = False,
) -> dict[str, Any]:
    """lm-eval results (JSON-safe) for ``base_model`` (+ ``adapter_dir`` via peft), one model load, one
    ``simple_evaluate`` per few-shot group. Runs in-process or inside a Ray task."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    device = resolve_device(device)
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    model_args: dict[str, Any] = {"pretrained": str(base_model), "dtype": dtype}
    if adapter_dir is not None:
        model_args["peft"] = str(adapter_dir)
    lm = HFLM(**model_args, batch_size=batch_size, device=device)
    # Tasks resolve within include_path only (what check_tasks_offline verified): lm-eval's built-in tasks
    # download from the hub, and indexing their ~14k YAMLs costs seconds per run.
    task_manager = TaskManager(
        include_path=[str(p) for p in include_path] or None, include_defaults=include_defaults
    )
    merged: dict[str, Any] = {}
    per_question: dict[str, dict[str, list[float]]] = {}
    for shots, group in group_by_fewshot(list(tasks), num_fewshot).items():
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=group,
            num_fewshot=shots,
            task_manager=task_manager,
            limit=limit,
            log_samples=True,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
        if out is None:  # non-zero rank under accelerate; never the case here
            continue
        per_question.update(per_question_scores(out.pop("samples", None) or {}))
        _merge(merged, json.loads(json.dumps(jsonable(out), default=str)))
    merged["selectmoe"] = {"model_args": model_args, "device": device, "num_fewshot": dict(num_fewshot)}
    merged[PER_QUESTION] = per_question
    return merged


def per_question_scores(samples: Mapping[str, list[dict[str, Any]]]) -> dict[str, dict[str, list[float]]]:
    """``{task: {"doc_id": [...], metric: [...]}}`` from lm-eval's logged samples, sorted by ``doc_id``:
    what a paired comparison of two runs on the same questions needs (the aggregate accuracy hides which
    questions each run got right). Numeric metrics only."""
    table: dict[str, dict[str, list[float]]] = {}
    for task, rows in samples.items():
        rows = sorted(rows, key=lambda r: r["doc_id"])
        metrics = [
            m
            for m in (rows[0].get("metrics") or [] if rows else [])
            if all(isinstance(r.get(m), (int, float)) and not isinstance(r.get(m), bool) for r in rows)
        ]
        table[task] = {"doc_id": [int(r["doc_id"]) for r in rows]}
        for m in metrics:
            table[task][m] = [float(r[m]) for r in rows]
    return table


def summarize(results: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from lm-eval's ``results`` (and ``groups``); numeric values only, the
    ``,none`` filter suffix dropped (other filters kept: ``exact_match,strict-match``)."""
    table: dict[str, dict[str, float]] = {}
    for section in ("results", "groups"):
        for task, metrics in (results.get(section) or {}).items():
            for key, value in metrics.items():
                if key == "alias" or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                if isinstance(value, float) and math.isnan(value):
                    continue
                table.setdefault(task, {})[key.removesuffix(",none")] = float(value)
    return table


def comparison_rows(runs: Mapping[str, Mapping[str, Mapping[str, float]]]) -> list[dict[str, Any]]:
    rows = []
    for run, tasks in runs.items():
        row: dict[str, Any] = {"run": run}
        for task, metrics in tasks.items():
            for metric, value in metrics.items():
                if not metric.endswith("_stderr") and "_stderr," not in metric:
                    row[f"{task}/{metric}"] = round(value, 4)
        rows.append(row)
    return rows


def comparison_markdown(runs: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    rows = comparison_rows(runs)
    cols = sorted({k for r in rows for k in r if k != "run"})
    cells = []
    for row, (run, tasks) in zip(rows, runs.items(), strict=True):
        line = [run]
        for col in cols:
            if col not in row:
                line.append("")
                continue
            task, metric = col.split("/", 1)
            name, _, filt = metric.partition(",")
            stderr = tasks[task].get(f"{name}_stderr" + (f",{filt}" if filt else ""))
            line.append(f"{row[col]:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else ""))
        cells.append(line)
    return markdown_table(["run", *cols], cells)


# ------------------------------------------------------------------------------------------- stage


def _use_ray_gpus(cfg: EvaluateConfig) -> bool:
    from selectmoe.ray_utils import cluster_gpus

    return (
        cfg.device in ("auto", "cuda")
        and cfg.num_gpus_per_replica > 0
        and cluster_gpus() >= cfg.num_gpus_per_replica
    )


def run_evaluate(cfg: EvaluateConfig) -> EvaluateResult:
    t0 = time.perf_counter()
    if not cfg.tasks:
        raise ValueError("evaluate.tasks is empty")
    check_inputs("evaluate", cfg)
    runs = discover_runs(cfg)
    for adapter in runs.values():
        if adapter is not None:
            check_adapter(adapter, cfg.base_model)  # every adapter validated before anything is evaluated
    include_path = [
        *write_less_tasks(cfg, Path(cfg.output_dir) / "tasks"),
        *stage_task_dirs(cfg.include_path),
    ]
    check_tasks_offline(cfg, include_path)
    kwargs = dict(
        num_fewshot=dict(cfg.num_fewshot),
        include_path=include_path,
        batch_size=cfg.batch_size,
        limit=cfg.limit,
    )
    if _use_ray_gpus(cfg):
        import ray

        mode = "ray-gpu"
        remote = ray.remote(num_gpus=cfg.num_gpus_per_replica)(evaluate_model)
        refs = {
            run: remote.remote(cfg.base_model, adapter, list(cfg.tasks), device="cuda", **kwargs)
            for run, adapter in runs.items()
        }
        all_results = dict(zip(refs, ray.get(list(refs.values())), strict=True))
    else:
        mode = "in-process"
        all_results = {
            run: evaluate_model(cfg.base_model, adapter, list(cfg.tasks), device=cfg.device, **kwargs)
            for run, adapter in runs.items()
        }
    out_dir = Path(cfg.output_dir)
    paths, table = {}, {}
    for run, results in all_results.items():
        path = out_dir / run / "results.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / f"{PER_QUESTION}.json").write_text(json.dumps(results.pop(PER_QUESTION, {})) + "\n")
        path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        paths[run] = str(path)
        table[run] = summarize(results)
    (out_dir / "comparison.json").write_text(
        json.dumps({"runs": table, "rows": comparison_rows(table)}, indent=2, sort_keys=True) + "\n"
    )
    (out_dir / "comparison.md").write_text(comparison_markdown(table))
    wall = time.perf_counter() - t0
    write_manifest(
        out_dir,
        stage="evaluate",
        config=cfg,
        inputs={run: str(a) for run, a in runs.items() if a is not None},
        counts={"runs": len(runs), "tasks": len(cfg.tasks)},
        wall_s=wall,
        extra={"mode": mode, "runs": table},
    )
    return EvaluateResult(output_dir=str(out_dir), runs=table, results_paths=paths, mode=mode, wall_s=wall)
