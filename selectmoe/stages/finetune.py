"""Stage 4a: LoRA fine-tune of a dense target LM on each selection, on Ray Train (the shared loop).

For every ``name -> file`` in ``FinetuneConfig.train_files`` (selection JSONL lines ``{dataset, id, scores,
cluster, messages}``):

1. Ray Data ``read_json(file)`` -> ``map_batches(encode_rows)`` (THE encoder) with the training chat template and
   ``label_mode`` (LESS: ``assistant_only``) at ``max_length``, materialised once (so the epochs do not
   re-encode) and counted (rows, tokens, label tokens, truncated rows).
2. :func:`selectmoe.training.loop.fit` on a ``TorchTrainer``: any HF causal LM + peft LoRA (``lora_r``,
   ``lora_alpha``, ``lora_dropout`` on ``lora_target_modules``), AdamW at ``lr``, linear schedule with
   ``warmup_ratio``, global batch ``batch_size`` = ``micro_batch_size`` x grad-accum x ``num_workers``
   exactly (an inexact split, or a selection smaller than one global batch, is an error naming the
   numbers to change -- never a silent change). Only the LoRA tensors are checkpointed
   (``get_peft_model_state_dict`` / ``set_peft_model_state_dict``), and a rerun with the same config
   resumes from the last checkpoint (the Ray run name is the run's identity: every training setting, the
   base model's and the data's content, the training code; see ``selectmoe.training.identity``).
3. ``output_dir/<name>/adapter/``: ``PeftModel.save_pretrained`` (safetensors ``adapter_model``,
   ``adapter_config.json`` whose ``base_model_name_or_path`` is ``base_model``) + the tokenizer; it loads
   with ``PeftModel.from_pretrained(base, dir)`` and lm-eval's ``peft=dir``. With ``merge_adapter`` also
   ``output_dir/<name>/merged/`` (a plain HF model). ``_manifest.json`` per run and for the stage.

Pad token: when the tokenizer has none, ``<pad>`` is added and the embeddings are resized for training
(the new rows stay frozen, as everything but LoRA is). Pads sit only after the real tokens (right
padding, causal attention, labels -100), so they never influence a trained position: the adapter does
not contain the embeddings (``save_embedding_layers=False``) and applies to the unmodified base model.
The tokenizer saved beside the adapter carries the added pad token.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from selectmoe import storage
from selectmoe.config import FinetuneConfig
from selectmoe.manifest import write_manifest
from selectmoe.stages.contract import check_inputs
from selectmoe.training.batching import grad_accum_steps, steps_per_epoch
from selectmoe.training.loop import METRICS_LOG

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
PAD_TOKEN = "<pad>"


@dataclass
class RunResult:
    name: str
    adapter_dir: str
    merged_dir: str | None
    n_rows: int
    n_tokens: int
    n_label_tokens: int
    n_truncated: int
    steps: int
    first_loss: float | None
    last_loss: float | None
    wall_s: float
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) as reported

    def summary(self) -> dict[str, Any]:
        return {
            "rows": self.n_rows,
            "steps": self.steps,
            "tokens": self.n_tokens,
            "first_loss": None if self.first_loss is None else round(self.first_loss, 4),
            "last_loss": None if self.last_loss is None else round(self.last_loss, 4),
            "wall_s": round(self.wall_s, 1),
        }


@dataclass
class FinetuneResult:
    output_dir: str
    runs: dict[str, RunResult]
    wall_s: float

    def summary(self) -> dict[str, Any]:
        return {
            "runs": {name: run.summary() for name, run in self.runs.items()},
            "wall_s": round(self.wall_s, 1),
        }


# ------------------------------------------------------------------------------------------ model side


@dataclass
class LoraModelFactory:
    """Picklable ``model_fn`` of the loop: the base causal LM (CPU, loaded directly in the loop's dtype: never
    an fp32 copy on a bf16 run) with a fresh LoRA adapter."""

    base_model: str
    r: int
    alpha: int
    dropout: float
    target_modules: list[str]
    vocab_size: int | None = None  # resize the embeddings to this (a pad token was added)
    pad_token_id: int | None = None

    def lora_config(self):
        from peft import LoraConfig, TaskType

        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            bias="none",
        )

    def base(self, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        # a train worker on any node: a node-local copy of a base model on shared storage
        model = AutoModelForCausalLM.from_pretrained(storage.local_copy(self.base_model), dtype=dtype)
        if self.vocab_size is not None and model.get_input_embeddings().weight.shape[0] != self.vocab_size:
            model.resize_token_embeddings(self.vocab_size, mean_resizing=False)
        if self.pad_token_id is not None:
            model.config.pad_token_id = self.pad_token_id
        for p in model.parameters():  # everything frozen (resized embeddings included); LoRA is added next
            p.requires_grad_(False)
        return model

    def __call__(self, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        from peft import get_peft_model

        return get_peft_model(self.base(dtype), self.lora_config())


def export_lora(model) -> dict[str, torch.Tensor]:
    """The LoRA tensors only (peft's adapter state dict: adapter name stripped, no embeddings)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, save_embedding_layers=False)


def import_lora(model, tensors: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, tensors)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(f"LoRA tensors do not fit the model: unexpected keys {unexpected[:5]}")


# ------------------------------------------------------------------------------------------- metrics


def read_losses(path: str | Path) -> list[tuple[int, float]]:
    """``(step, loss)`` from a metrics log, one per step (a restarted run's re-reports replace older ones)."""
    by_step: dict[int, float] = {}
    p = Path(path)
    if not p.is_file():
        return []
    for line in p.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if "loss" in row and "step" in row:
            by_step[int(row["step"])] = float(row["loss"])
    return sorted(by_step.items())


# ---------------------------------------------------------------------------------------------- data


def check_batch_arithmetic(cfg: FinetuneConfig, n_rows: int, *, name: str = "", path: str = "") -> int:
    """Grad-accum steps for ``cfg``; raises ``ValueError`` saying which numbers to lower when the
    global batch is not exact or when ``n_rows`` does not fill one global batch."""
    ga = grad_accum_steps(cfg.batch_size, cfg.micro_batch_size, cfg.num_workers)
    if steps_per_epoch(n_rows, cfg.batch_size, cfg.num_workers) < 1:
        where = f"run {name!r} ({path}): " if name else ""
        raise ValueError(
            f"{where}{n_rows} selected rows do not fill one global batch of finetune.batch_size="
            f"{cfg.batch_size} (= micro_batch_size {cfg.micro_batch_size} x grad_accum {ga} x num_workers "
            f"{cfg.num_workers}); lower finetune.batch_size (to at most {n_rows // cfg.num_workers * cfg.num_workers}"
            f" with micro_batch_size dividing batch_size/num_workers) or select more data "
            f"(select.selection_percentage)"
        )
    return ga


def prepare_tokenizer(cfg: FinetuneConfig):
    """The base model's tokenizer; ``<pad>`` added when it has none (returns ``(tokenizer, added)``)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(storage.local_copy(cfg.base_model))
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{cfg.base_model}: a fast tokenizer is required (the encoder uses offsets)")
    added = False
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        added = True
    return tokenizer, added


def build_dataset(cfg: FinetuneConfig, path: str, tokenizer_dir: str):
    """The encoded, materialised Ray Dataset of a selection file, and its counts."""
    import pyarrow.compute as pc
    import ray.data

    from selectmoe.data.encoding import EncodingSpec
    from selectmoe.data.ray_io import encode_rows

    if not storage.is_file(path):
        raise FileNotFoundError(f"selection file {path} does not exist (run the select stage first)")
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    spec = EncodingSpec(max_length=cfg.max_length, label_mode=cfg.label_mode).to_dict()
    # read by Ray Data tasks on any node: the URI itself, not a driver copy (Ray resolves it with pyarrow,
    # which reads the endpoint and keys from the environment; `filesystem=` is refused with lines=True)
    ds = ray.data.read_json(str(path), lines=True, file_extensions=None)
    keep = [c for c in ("id", "dataset", "messages") if c in ds.columns()]
    if "messages" not in keep:
        raise ValueError(f"{path}: selection rows need a 'messages' field")
    ds = ds.select_columns(keep).map_batches(
        encode_rows,
        fn_kwargs={
            "tokenizer_dir": tokenizer_dir,
            "spec": spec,
            "columns": ["input_ids", "labels", "n_tokens", "truncated"],
        },
        batch_format="pyarrow",
        batch_size=256,
    )
    ds = ds.materialize()
    counts = {"rows": 0, "tokens": 0, "label_tokens": 0, "truncated": 0}
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=4096):
        counts["rows"] += batch.num_rows
        counts["tokens"] += int(pc.sum(batch["n_tokens"]).as_py() or 0)
        counts["truncated"] += int(pc.sum(pc.cast(batch["truncated"], "int64")).as_py() or 0)
        flat = pc.list_flatten(batch["labels"])
        counts["label_tokens"] += int(pc.sum(pc.cast(pc.not_equal(flat, -100), "int64")).as_py() or 0)
    return ds, counts


# ----------------------------------------------------------------------------------------------- run


def model_input(model: str) -> Any:
    """A manifest input for a model: its directory's fingerprint, or its name (a hub id)."""
    return str(model) if storage.exists(model) else {"name": str(model)}


def _run_name(cfg: FinetuneConfig, name: str, path: str, use_gpu: bool) -> str:
    from selectmoe.training.identity import run_name, training_settings

    settings = training_settings(cfg, exclude=("base_model",))
    inputs = {"base_model": cfg.base_model, "data": path}
    return run_name(f"finetune-{name}", settings, inputs, stage_module=__name__, use_gpu=use_gpu)


def finetune_one(cfg: FinetuneConfig, name: str, path: str, *, use_gpu: bool) -> RunResult:
    """Fine-tune one LoRA adapter on one selection file; writes ``output_dir/<name>/``."""
    from selectmoe.training.loop import LoopSpec, fit

    t0 = time.perf_counter()
    run_dir = Path(cfg.output_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer, pad_added = prepare_tokenizer(cfg)
    grad_accum_steps(cfg.batch_size, cfg.micro_batch_size, cfg.num_workers)  # exact split, before any work
    ds, counts = build_dataset(cfg, path, cfg.base_model)
    check_batch_arithmetic(cfg, counts["rows"], name=name, path=path)
    if counts["truncated"]:
        logger.warning(
            "%s: %d of %d rows truncated to %d tokens",
            name,
            counts["truncated"],
            counts["rows"],
            cfg.max_length,
        )

    factory = LoraModelFactory(
        base_model=str(cfg.base_model),
        r=cfg.lora_r,
        alpha=cfg.lora_alpha,
        dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules),
        vocab_size=len(tokenizer) if pad_added else None,
        pad_token_id=tokenizer.pad_token_id if pad_added else None,
    )
    spec = LoopSpec(
        model_fn=factory,
        export_fn=export_lora,
        import_fn=import_lora,
        n_rows=counts["rows"],
        pad_token_id=int(tokenizer.pad_token_id),
        train=cfg,
    )
    ray_name = _run_name(cfg, name, path, use_gpu)
    result = fit(
        spec,
        ds,
        name=ray_name,
        use_gpu=use_gpu,
        metrics_dir=run_dir,
    )

    # Rebuild on the driver, load the trained LoRA tensors, save the peft adapter (+ merged model).
    model = factory()
    import_lora(model, result.trainable_state())
    adapter_dir = run_dir / ADAPTER_DIR
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    model.save_pretrained(str(adapter_dir), safe_serialization=True, save_embedding_layers=False)
    tokenizer.save_pretrained(str(adapter_dir))
    merged_dir = None
    if cfg.merge_adapter:
        merged_dir = run_dir / MERGED_DIR
        if merged_dir.exists():
            shutil.rmtree(merged_dir)
        merged = model.merge_and_unload()
        merged.save_pretrained(str(merged_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(merged_dir))

    losses = read_losses(run_dir / METRICS_LOG)
    run = RunResult(
        name=name,
        adapter_dir=str(adapter_dir),
        merged_dir=None if merged_dir is None else str(merged_dir),
        n_rows=counts["rows"],
        n_tokens=counts["tokens"],
        n_label_tokens=counts["label_tokens"],
        n_truncated=counts["truncated"],
        steps=result.steps,
        first_loss=losses[0][1] if losses else None,
        last_loss=losses[-1][1] if losses else result.metrics.get("loss"),
        wall_s=time.perf_counter() - t0,
        losses=losses,
    )
    write_manifest(
        run_dir,
        stage="finetune",
        config=cfg,
        inputs={"train_file": path, "base_model": model_input(cfg.base_model)},
        counts={
            "rows": run.n_rows,
            "tokens": run.n_tokens,
            "label_tokens": run.n_label_tokens,
            "truncated": run.n_truncated,
            "steps": run.steps,
            "rows_dropped_per_epoch": run.n_rows
            - steps_per_epoch(run.n_rows, cfg.batch_size, cfg.num_workers) * cfg.batch_size,
        },
        seed=cfg.seed,
        wall_s=run.wall_s,
        extra={
            "run": name,
            "ray_run": ray_name,
            "checkpoint": result.checkpoint_path,
            "first_loss": run.first_loss,
            "last_loss": run.last_loss,
            "pad_token_added": pad_added,
            "final_metrics": result.metrics,
        },
    )
    return run


def run_config(cfg: FinetuneConfig, name: str) -> FinetuneConfig:
    """The settings of run ``name``: ``epochs_by_run`` applied, and dropped, so that one run's override
    does not enter (and change) the identity of the others."""
    return dataclasses.replace(cfg, epochs=cfg.epochs_by_run.get(name, cfg.epochs), epochs_by_run={})


def run_finetune(cfg: FinetuneConfig) -> FinetuneResult:
    """One LoRA adapter per ``cfg.train_files`` entry (sequential runs; each may use several workers)."""
    from selectmoe.ray_utils import resolve_use_gpu

    t0 = time.perf_counter()
    if not cfg.train_files:
        raise ValueError("finetune.train_files is empty: nothing to fine-tune")
    unknown = sorted(set(cfg.epochs_by_run) - set(cfg.train_files))
    if unknown:
        raise ValueError(f"finetune.epochs_by_run.{unknown[0]}: no such run in finetune.train_files")
    check_inputs("finetune", cfg)
    grad_accum_steps(cfg.batch_size, cfg.micro_batch_size, cfg.num_workers)  # fail before any run starts
    use_gpu = resolve_use_gpu(cfg.use_gpu)
    runs = {
        name: finetune_one(run_config(cfg, name), name, str(path), use_gpu=use_gpu)
        for name, path in cfg.train_files.items()
    }
    wall = time.perf_counter() - t0
    write_manifest(
        cfg.output_dir,
        stage="finetune",
        config=cfg,
        inputs={
            "base_model": model_input(cfg.base_model),
            **{f"train_file:{n}": str(p) for n, p in cfg.train_files.items()},
        },
        counts={
            "runs": len(runs),
            "rows": sum(r.n_rows for r in runs.values()),
            "tokens": sum(r.n_tokens for r in runs.values()),
            "steps": sum(r.steps for r in runs.values()),
        },
        seed=cfg.seed,
        wall_s=wall,
        extra={"runs": {n: {**r.summary(), "adapter_dir": r.adapter_dir} for n, r in runs.items()}},
    )
    return FinetuneResult(output_dir=str(cfg.output_dir), runs=runs, wall_s=wall)
