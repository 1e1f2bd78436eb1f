"""Stage 1 -- warmup: train the Select-MoE quality gates (+ routers) on Ray Train, probe them, save a selector.

Data: the ingested pool in ``ingest_dir`` (the ingest stage writes it; this stage never ingests);
``probe_samples`` rows are held out (seeded) for the
quality probe and never trained on; ``subset_ratio`` keeps a seeded fraction of the rest (a per-id hash of
``seed``, so the driver knows the exact row count without encoding). Ray Data reads the shards and runs
THE encoder (:func:`selectmoe.data.ray_io.encode_rows`) with the hold-out/subset filter fused in; the encoded dataset is
materialised once before training (every worker reads all of it: the loop shuffles globally per epoch).
The Ray Train run name is the run's identity (:mod:`selectmoe.training.identity`): a changed setting,
model, pool or training code starts a fresh run, an unchanged one resumes or returns the finished run.

Training: :func:`selectmoe.training.loop.fit` with exact gradient accumulation (global label / sample /
quality-token counts), bf16 autocast on GPU with fp32 trainable parameters, trainable-only checkpoints
in ``storage_path``, ``max_failures`` restarts from the last checkpoint, ``resume_from`` for a stopped run.
Metrics per log step: lm_loss, quality_loss, aux_loss, mean gate ``g`` per layer, tokens/s; probe AUC at
each epoch end and before step 1.

Output (``output_dir``): ``model/`` (the selector artefact: ``load_selector`` it), ``train_metrics.jsonl``
(every log step's metrics) and ``_manifest.json`` (counts, probe before/after, final metrics).
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from selectmoe import storage
from selectmoe.config import WarmupConfig
from selectmoe.stages.contract import check_inputs

logger = logging.getLogger(__name__)

MODEL_SUBDIR = "model"
_SENTINEL_FULL = 1.0


@dataclass
class WarmupResult:
    output_dir: str
    model_dir: str  # the selector artefact
    checkpoint_path: str
    n_pool: int  # valid ingested rows
    n_train_rows: int
    n_probe: int
    steps: int
    tokens: float  # non-pad tokens trained on (all workers)
    probe: dict[str, Any] = field(default_factory=dict)  # {"probe_auc", "per_corruption", "before", "after"}
    metrics: dict[str, Any] = field(default_factory=dict)  # last reported metrics (rank 0)
    wall_s: float = 0.0
    truncation: dict[str, Any] = field(default_factory=dict)  # per dataset (data.truncation)

    def summary(self) -> dict[str, Any]:
        out = {
            "model_dir": self.model_dir,
            "n_train_rows": self.n_train_rows,
            "n_probe": self.n_probe,
            "steps": self.steps,
            "tokens": int(self.tokens),
            "wall_s": round(self.wall_s, 1),
        }
        for key in ("probe_auc", "probe_auc_before"):
            if key in self.probe:
                out[key] = round(float(self.probe[key]), 4)
        for key in ("lm_loss", "quality_loss", "tokens_per_s"):
            if key in self.metrics:
                out[key] = round(float(self.metrics[key]), 4)
        return out


# ------------------------------------------------------------------------------------- picklable parts


def quality_config_overrides(cfg: WarmupConfig) -> dict[str, Any]:
    """The quality-loss fields written into the model config (and the selector's config overrides)."""
    ql = cfg.quality_loss
    params = ql.params if isinstance(ql.params, dict) else dict(ql.params or {})
    return {
        "quality_loss_type": str(ql.type),
        "quality_loss_weight": float(ql.weight),
        "quality_loss_params": {k: float(v) for k, v in params.items()},
        "sample_wise_averaging": bool(ql.sample_wise_averaging),
        "enable_load_balancing": bool(ql.enable_load_balancing),
        "quality_token_scope": str(ql.token_scope),
    }


class SelectorModelFactory:
    """``LoopSpec.model_fn``: the converted Select-MoE (CPU, loaded directly in the loop's dtype; gates and
    routers fp32) with the quality-loss config and the trainable set applied."""

    def __init__(
        self, model_dir: str, trainable: str, overrides: Mapping[str, Any], lora_r: int, lora_alpha: float
    ):
        self.model_dir = str(model_dir)
        self.trainable = trainable
        self.overrides = dict(overrides)
        self.lora_r = int(lora_r)
        self.lora_alpha = float(lora_alpha)

    def __call__(self, dtype: torch.dtype = torch.float32):
        from selectmoe.model import SelectMoeForCausalLM, apply_trainable
        from selectmoe.storage import local_copy

        # a train worker on any node: a node-local copy of the (possibly shared-storage) model
        model = SelectMoeForCausalLM.from_pretrained(local_copy(self.model_dir), dtype=dtype)
        for key, value in self.overrides.items():
            setattr(model.config, key, value)
        apply_trainable(
            model, self.trainable, lora_r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=0.0
        )
        return model


def export_params(model) -> dict[str, torch.Tensor]:
    """Checkpoint export: the raw trainable parameters by name (LoRA A/B unmerged: resume is exact)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def import_params(model, tensors: Mapping[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in tensors if n not in params]
    if missing:
        raise ValueError(f"checkpoint tensors without a parameter in the model: {missing[:5]}")
    for name, value in tensors.items():
        params[name].copy_(value.to(device=params[name].device, dtype=params[name].dtype))


class GateMetrics:
    """``LoopSpec.metrics_fn``: mean gate ``g = sigmoid(quality_score)`` per layer over the scoped tokens."""

    def __init__(self, scope: str):
        self.scope = scope

    def __call__(self, out, mb) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        from selectmoe.model import token_mask_for_scope

        router_logits = getattr(out, "router_logits", None)
        if not router_logits:
            return {}
        mask = token_mask_for_scope(mb["attention_mask"], mb["labels"], self.scope).float()
        n = mask.sum()
        result = {}
        for i, layer in enumerate(router_logits):
            g = torch.sigmoid(layer["quality_score"].detach().float().reshape(mask.shape))
            result[f"g_mean_l{i}"] = ((g * mask).sum(), n)
        return result


def _unit(seed: int, rid: str) -> float:
    h = hashlib.blake2b(f"{seed}:{rid}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64


class TrainRowFilter:
    """Keeps a row iff it is not held out and (``subset_ratio`` < 1) its seeded id hash is below the ratio."""

    def __init__(self, held_out: Sequence[str], subset_ratio: float, seed: int):
        self.held_out = frozenset(str(i) for i in held_out)
        self.subset_ratio = float(subset_ratio)
        self.seed = int(seed)

    def keep(self, rid: str) -> bool:
        if rid in self.held_out:
            return False
        return self.subset_ratio >= _SENTINEL_FULL or _unit(self.seed, rid) < self.subset_ratio


# ------------------------------------------------------------------------------------------ the stage


def _read_ids(shards: Sequence[str]) -> list[str]:
    import pyarrow.parquet as pq

    ids: list[str] = []
    for path in shards:
        table = pq.read_table(storage.open_input(path), columns=["id"])
        ids.extend(str(x) for x in table.column("id").to_pylist())
    return ids


def split_rows(
    ids: Sequence[str], *, probe_samples: int, subset_ratio: float, seed: int
) -> tuple[list[str], TrainRowFilter, int]:
    """``(held_out_ids, filter, n_train_rows)``: a seeded hold-out of ``probe_samples`` ids (at most a
    quarter of the pool), then the seeded subset of the rest."""
    if len(set(ids)) != len(ids):
        raise ValueError("ingested pool has duplicate ids; the hold-out needs unique ids")
    if not 0 < subset_ratio <= 1:
        raise ValueError(f"warmup.subset_ratio must be in (0, 1], got {subset_ratio}")
    n_probe = max(0, min(int(probe_samples), len(ids) // 4))
    held = sorted(random.Random(seed).sample(sorted(ids), n_probe)) if n_probe else []
    row_filter = TrainRowFilter(held, subset_ratio, seed)
    n_train = sum(1 for i in ids if row_filter.keep(i))
    return held, row_filter, n_train


def run_warmup(cfg: WarmupConfig, *, callbacks: list | None = None, name: str | None = None) -> WarmupResult:
    """Run the warmup stage (see module docstring). ``callbacks``: Ray Train ``UserCallback`` s (Tune uses one
    to forward reports); ``name``: the Ray Train run name's prefix (the rest is the run's identity hash)."""
    import ray
    from transformers import AutoTokenizer

    from selectmoe.data.encoding import EncodingSpec
    from selectmoe.data.ingest import iter_ingested_records, list_shards
    from selectmoe.data.ray_io import encode_rows, read_ingested
    from selectmoe.data.truncation import TRUNCATION_COLUMNS, truncation_summary
    from selectmoe.manifest import write_manifest
    from selectmoe.model import export_trainable, save_selector
    from selectmoe.ray_utils import resolve_use_gpu
    from selectmoe.scoring.probe import ProbeEval
    from selectmoe.training.identity import run_name as training_run_name
    from selectmoe.training.identity import training_settings
    from selectmoe.training.loop import LoopSpec, fit

    t0 = time.perf_counter()
    check_inputs("warmup", cfg)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed = cfg.seed
    shards = [str(s) for s in list_shards(cfg.ingest_dir)]
    ids = _read_ids(shards)
    held, row_filter, n_train = split_rows(
        ids, probe_samples=cfg.probe_samples, subset_ratio=cfg.subset_ratio, seed=seed
    )
    held_set = set(held)
    probe_records = [
        {"id": r["id"], "messages": r["messages"]}
        for r in iter_ingested_records(cfg.ingest_dir, shards=shards)
        if str(r["id"]) in held_set
    ]
    spec_enc = EncodingSpec(max_length=cfg.max_length, label_mode=cfg.label_mode)
    tokenizer = AutoTokenizer.from_pretrained(storage.local_copy(cfg.model_dir))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError(f"tokenizer of {cfg.model_dir} has neither a pad nor an eos token")
    use_gpu = resolve_use_gpu(cfg.use_gpu)

    ds = (
        read_ingested(cfg.ingest_dir, shards=shards)
        .map_batches(
            encode_rows,
            fn_kwargs={
                "tokenizer_dir": str(cfg.model_dir),
                "spec": spec_enc.to_dict(),
                "columns": ["input_ids", "labels", "n_tokens", "dataset", "truncated", "full_tokens"],
                "keep": row_filter.keep,
            },
            batch_format="pyarrow",
            batch_size=256,
        )
        .materialize()  # encoded once: every worker reads all of it (the loop's global shuffle)
    )
    flags = ds.select_columns(list(TRUNCATION_COLUMNS)).to_arrow_refs()
    truncation = truncation_summary(
        "warmup", ray.get(flags), spec_enc.max_length, effect="the gates train on a prefix"
    )

    overrides = quality_config_overrides(cfg)
    factory = SelectorModelFactory(cfg.model_dir, cfg.trainable, overrides, cfg.lora_r, cfg.lora_alpha)
    spec = LoopSpec(
        model_fn=factory,
        export_fn=export_params,
        import_fn=import_params,
        n_rows=n_train,
        pad_token_id=int(pad_id),
        train=cfg,
        count_kwargs=("num_samples_in_batch", "num_quality_tokens_in_batch"),
        quality_token_scope=overrides["quality_token_scope"],
        forward_kwargs={"output_router_logits": True},
        metrics_fn=GateMetrics(overrides["quality_token_scope"]),
        eval_fn=ProbeEval(probe_records, str(cfg.model_dir), spec_enc.to_dict(), seed)
        if probe_records
        else None,
        eval_before=bool(probe_records),
        resume_from=cfg.resume_from,
    )
    run_name = training_run_name(
        name or "warmup",
        training_settings(cfg, exclude=("model_dir", "ingest_dir")),
        {"model": cfg.model_dir, **{f"shard:{Path(s).name}": s for s in shards}},
        stage_module=__name__,
        use_gpu=use_gpu,
    )
    result = fit(
        spec,
        ds,
        name=run_name,
        use_gpu=use_gpu,
        callbacks=callbacks,
        metrics_dir=out_dir,
    )

    # Rebuild on the driver, load the trained parameters, export plain (LoRA-merged) selector tensors.
    model = factory()
    import_params(model, result.trainable_state())
    tensors = export_trainable(model)
    model_dir = save_selector(
        out_dir / MODEL_SUBDIR,
        base_model_dir=cfg.model_dir,
        trainable_mode=cfg.trainable,
        tensors=tensors,
        encoding=spec_enc.to_dict(),
        tokenizer=tokenizer,
        config_overrides=overrides,
    )
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str, bool))}
    probe = {}
    if probe_records:
        probe = {
            "probe_auc": metrics.get("probe_auc"),
            "probe_auc_before": metrics.get("probe_auc_before"),
            "per_corruption": {k[len("probe_auc_"):]: v for k, v in metrics.items()
                               if k.startswith("probe_auc_") and not k.endswith("_before")},
            "before": {k[: -len("_before")]: v for k, v in metrics.items() if k.endswith("_before")},
            "after": {k: v for k, v in metrics.items() if k.startswith("probe_") and not k.endswith("_before")},
            "n_clean": len(probe_records),
            "auc_kind": "ROC AUC (sklearn), all clean vs all corrupted twins (unpaired)",
        }  # fmt: skip
    wall = time.perf_counter() - t0
    res = WarmupResult(
        output_dir=str(out_dir),
        model_dir=str(model_dir),
        checkpoint_path=result.checkpoint_path,
        n_pool=len(ids),
        n_train_rows=n_train,
        n_probe=len(probe_records),
        steps=result.steps,
        tokens=float(metrics.get("tokens_seen", 0.0)),
        probe=probe,
        metrics=metrics,
        wall_s=wall,
        truncation=truncation,
    )
    write_manifest(
        out_dir,
        stage="warmup",
        config=cfg,
        inputs=[cfg.model_dir, *shards],
        counts={
            "rows": n_train,
            "pool_rows": len(ids),
            "probe_rows": len(probe_records),
            "steps": result.steps,
            "tokens": int(res.tokens),
            "truncated": sum(d["truncated"] for d in truncation["datasets"].values()),
        },
        seed=seed,
        wall_s=wall,
        extra={
            "probe": probe,
            "metrics": metrics,
            "checkpoint": result.checkpoint_path,
            "ray_run": run_name,
            "truncation": truncation,
        },
    )
    logger.info("warmup done: %s", res.summary())
    return res


__all__ = [
    "GateMetrics",
    "SelectorModelFactory",
    "WarmupResult",
    "export_params",
    "import_params",
    "quality_config_overrides",
    "run_warmup",
    "split_rows",
]
