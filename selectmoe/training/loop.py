"""THE Ray Train torch loop, shared by warmup (Select-MoE gates/routers) and finetune (LoRA on a dense target).

Contract (what a caller provides, in a picklable :class:`LoopSpec`):

- ``model_fn(dtype)`` builds the model on CPU, loaded directly in ``dtype`` (bf16 on a bf16 GPU run, else
  fp32; the model's fp32 modules kept fp32), with exactly the trainable parameters ``requires_grad``;
  ``export_fn(model) -> {name: tensor}`` / ``import_fn(model, tensors)`` move the trainable state in and
  out (only those tensors are checkpointed). The loss is the model forward's ``loss``.
- ``train``: the stage's config as is (a :class:`selectmoe.config.TrainingConfig`: warmup's or finetune's),
  hyper-parameters and Ray Train resources alike.
- The Ray Dataset ``train`` (materialised) yields rows with ``input_ids`` and ``labels`` (variable length,
  already encoded by the Data pipeline). Every worker reads all of it once into an Arrow table (memory:
  the encoded pool per worker, ~8 bytes a token) and takes its rows from the epoch's global order:
  a permutation of all rows seeded by ``(seed, epoch)`` (``shuffle``), global batch ``t`` being rows
  ``order[t*B:(t+1)*B]``, split into contiguous per-worker slices. So the order is global (not a local
  buffer over file order), differs per epoch, needs no replay to resume, and does not depend on the
  world size.

What the loop does per optimizer step: gathers its ``grad_accum`` micro-batches, all-reduces the global
label-token / sample / quality-token counts and passes them to the forward (``num_items_in_batch`` and the
names in ``count_kwargs``), so accumulation over micro-batches and workers equals one big batch exactly
for per-token losses (the loss is multiplied by the world size because DDP/FSDP average gradients). The
load-balancing loss is the exception: it is a product of two batch means, computed per micro-batch and
weighted by the micro-batch's share (as HF and Megatron do); measured gap in ``docs/architecture.md``.
AdamW over the trainable parameters only (kept fp32; frozen weights bf16 on GPU under bf16 autocast,
except the model's ``_keep_in_fp32_modules``: quality gates and routers), HF ``get_scheduler``,
``clip_grad_norm_``. Randomness (dropout, LoRA init) is reseeded from ``(seed, step, rank)`` at each
step, so no RNG state needs saving; CPU workers run torch's deterministic kernels with the thread count
their resources asked for (bit-reproducible runs, whatever ``OMP_NUM_THREADS`` the process inherited).

``strategy="fsdp"`` shards with FSDP2 (:mod:`selectmoe.training.fsdp`): one unit per decoder layer, fp32
shards, bf16 compute by policy on GPU; it runs on CPU workers over gloo too.

Checkpoints (every ``checkpoint_every`` steps, at the end, and at each epoch end of a run with an
``eval_fn``: Tune sees every epoch's eval), no pickle, full tensors
written by rank 0 (FSDP shards are gathered first): ``trainable.safetensors`` (trainable tensors only),
``optimizer.safetensors`` (AdamW moments keyed by parameter name), ``state.json`` (step, epoch, step in
epoch, scheduler and optimizer hyper-parameters). Resume reads ``ray.train.get_checkpoint()`` (a
``FailureConfig`` restart, or a rerun of the same run name: see :mod:`selectmoe.training.identity`) or
``LoopSpec.resume_from`` (a stopped run) and continues exactly where it was (tested bit for bit against
an uninterrupted run). A different world size or batch arithmetic is refused.

Metrics are computed at every log step (``log_every``) and go through ``ray.train.report`` from every
worker at the same steps; rank 0 attaches the checkpoint. Ray Train's controller takes one report per
worker per poll (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s) and ``report`` blocks until the previous one
was taken, so a report every few fast steps stalls training (measured: ~1.7 s per report, half the wall
time of a 51-step test run). Log steps therefore report at most once per poll period (rank 0's clock
decides for all ranks); the log steps in between ride along in the next report as ``log_history`` (a
list of every log step's metrics, the reported step last), which :func:`metrics_log_callback` writes out
line by line. Checkpoint steps and the last step always report; a plain epoch end is a log step (a
forced checkpoint there waits for the controller to take the log step just before it: docs/benchmarks.md,
"The demo within 10 minutes"). The optional
``eval_fn(model) -> {name: float}`` runs at each epoch end (rank 0; every rank under FSDP) and before
step 1 with ``eval_before`` (reported as ``<name>_before``); every report carries the latest eval values
(Tune schedulers need the metric in every result). Reports also carry ``tokens_seen`` (non-pad tokens,
all workers, persisted across restarts).

The step itself is :func:`forward_backward` + :func:`global_counts` (usable without Ray: the GA test and
the benchmark's bare loop run exactly it). Padding is THE padding (``data.encoding.pad_columns``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selectmoe import storage
from selectmoe.config import TrainingConfig
from selectmoe.data.encoding import IGNORE_INDEX, pad_columns
from selectmoe.manifest import jsonable
from selectmoe.training.batching import grad_accum_steps, steps_per_epoch

logger = logging.getLogger(__name__)

# Test hook (read on the driver, shipped in the loop config): "STEP:MARKER_FILE" makes rank 0 raise once
# after optimizer step STEP if MARKER_FILE does not exist yet (it is created first).
FAIL_ONCE_ENV = "SELECTMOE_FAIL_ONCE_AT_STEP"
TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"  # AdamW moments keyed "<param>::<field>", full tensors
METRICS_LOG = "train_metrics.jsonl"  # every log step's metrics, written on the driver by metrics_log_callback


@dataclass
class LoopSpec:
    """Everything a worker needs; shipped through ``train_loop_config`` (must be picklable)."""

    model_fn: Callable[[torch.dtype], torch.nn.Module]
    export_fn: Callable[[torch.nn.Module], dict[str, torch.Tensor]]
    import_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], Any]
    n_rows: int  # rows of the training dataset (sets steps per epoch and the schedule length)
    pad_token_id: int
    # the stage's training config as is: hyper-parameters (lr, epochs, global batch_size = micro_batch_size
    # x grad_accum x world size, ...) and Ray Train resources (num_workers, storage_path, ...)
    train: TrainingConfig
    scheduler: str = "linear"  # any transformers.get_scheduler name
    shuffle: bool = True  # a global permutation of all rows per epoch, seeded by (seed, epoch)
    cpu_threads: int = 1  # torch threads per CPU worker: the worker's CPU resources, set explicitly
    # extra global counts the forward accepts: num_samples_in_batch, num_quality_tokens_in_batch
    count_kwargs: tuple[str, ...] = ()
    quality_token_scope: str = "all"  # which tokens num_quality_tokens_in_batch counts (all | trained)
    forward_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {"output_router_logits": True}
    # per micro-batch extra metrics: (outputs, batch) -> {name: (sum, count)}; reported as sum/count
    metrics_fn: (
        Callable[[Any, dict[str, torch.Tensor]], dict[str, tuple[torch.Tensor, torch.Tensor]]] | None
    ) = None
    eval_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None  # epoch end, rank 0, eval mode
    eval_before: bool = False  # also run eval_fn before step 1; reported as "<name>_before" from then on
    resume_from: str | None = None  # checkpoint directory of a stopped run
    fail_once: str | None = None  # test hook, see FAIL_ONCE_ENV


@dataclass
class LoopResult:
    checkpoint_path: str  # the final checkpoint directory (trainable.safetensors + state.json)
    metrics: dict[str, Any]  # the last reported metrics (rank 0)
    steps: int
    wall_s: float

    def trainable_state(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(Path(self.checkpoint_path) / TRAINABLE_FILE))


def total_steps(spec: LoopSpec, world_size: int) -> tuple[int, int, int]:
    """``(grad_accum, steps_per_epoch, total_steps)`` for a spec on ``world_size`` workers."""
    ga = grad_accum_steps(spec.train.batch_size, spec.train.micro_batch_size, world_size)
    per_epoch = steps_per_epoch(spec.n_rows, spec.train.batch_size, world_size)
    if per_epoch < 1:
        raise ValueError(
            f"{spec.n_rows} training rows on {world_size} worker(s) do not fill one global batch of "
            f"{spec.train.batch_size}; lower batch_size or add data"
        )
    total = per_epoch * spec.train.epochs
    if spec.train.max_steps > 0:
        total = min(total, spec.train.max_steps)
    return ga, per_epoch, total


def fit(
    spec: LoopSpec,
    dataset,
    *,
    name: str,
    use_gpu: bool = False,
    callbacks: list | None = None,
    metrics_dir: str | Path | None = None,
    progress: bool | None = None,
) -> LoopResult:
    """Run the loop on a ``TorchTrainer``; returns the final checkpoint and metrics.

    Workers, resources, restarts and storage come from ``spec.train``. ``train.storage_path`` is a local path
    or URI; on a multi-node cluster it must be shared storage (a URI or an NFS path) or Ray Train cannot
    gather checkpoints. Rerunning with the same ``name`` and ``storage_path`` lets Ray Train restore the
    run's latest checkpoint (a local path is made absolute).
    ``metrics_dir``: also write every log step's metrics to ``metrics_dir/METRICS_LOG``, and show a steps/s
    bar on the driver's stderr from it (``progress=None``: on a terminal only).
    """
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    train = spec.train
    num_workers, resources_per_worker = train.num_workers, train.resources_per_worker
    _, _, n_total = total_steps(spec, num_workers)  # fail fast on batch arithmetic, before any worker starts
    if spec.fail_once is None and os.environ.get(FAIL_ONCE_ENV):
        spec = _replace(spec, fail_once=os.environ[FAIL_ONCE_ENV])
    cpus = (resources_per_worker or {}).get("CPU", 1)
    spec = _replace(spec, cpu_threads=max(1, int(cpus)))
    storage_path = resolve_storage(train.storage_path)
    _check_storage(storage_path)
    ray_path, ray_fs = storage.ray_storage(storage_path)  # a URI: the path in its bucket + the filesystem
    if metrics_dir is not None:
        callbacks = [
            metrics_log_callback(metrics_dir, storage_path=storage_path, name=name),
            *(callbacks or []),
        ]
    options = DataConfig.default_ingest_options() if hasattr(DataConfig, "default_ingest_options") else None
    options = options or ExecutionOptions()
    options.preserve_order = True  # deterministic split + order: exact resume and reproducible runs
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec},
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            # a plain dict: configs may hand over an OmegaConf mapping
            resources_per_worker=dict(resources_per_worker) if resources_per_worker else None,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=ray_path,
            storage_filesystem=ray_fs,
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
        datasets={"train": dataset},
        # every worker reads the whole (materialised) dataset; the loop picks its rows from the epoch's
        # global permutation, so the order is global and independent of Ray Data's split
        dataset_config=DataConfig(
            datasets_to_split=[], execution_options=options, enable_shard_locality=False
        ),
    )
    t0 = time.perf_counter()
    if metrics_dir is None:
        result = trainer.fit()
    else:
        from selectmoe.training.progress import MetricsProgress

        with MetricsProgress(Path(metrics_dir) / METRICS_LOG, n_total, name, enabled=progress):
            result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name!r} finished without a checkpoint")
    metrics = dict(result.metrics or {})
    # On shared storage the checkpoint is read back through a local copy (safetensors loads local files).
    local = ray_fs is None
    return LoopResult(
        checkpoint_path=result.checkpoint.path if local else result.checkpoint.to_directory(),
        metrics=metrics,
        steps=int(metrics.get("step", 0)),
        wall_s=time.perf_counter() - t0,
    )


def _replace(spec: LoopSpec, **changes) -> LoopSpec:
    import dataclasses

    return dataclasses.replace(spec, **changes)


def _check_storage(storage_path: str) -> None:
    if storage.is_uri(storage_path):
        return
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")] if ray.is_initialized() else []
    if len(nodes) > 1:
        logger.warning(
            "storage_path %s is a local path on a %d-node cluster: it must be shared storage (NFS) "
            "visible at the same path on every node, or use a URI (s3://, gs://)",
            storage_path,
            len(nodes),
        )


# ----------------------------------------------------------------------------------------------- worker


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function: :func:`_train` under deterministic CPU kernels (see ``determinism``)
    with the torch thread count the worker's resources asked for (never an inherited ``OMP_NUM_THREADS``)."""
    import ray.train.torch

    from selectmoe.training.determinism import deterministic_cpu, torch_threads

    spec: LoopSpec = config["spec"]
    device = ray.train.torch.get_device()
    with torch_threads(spec.cpu_threads), deterministic_cpu(enabled=device.type == "cpu"):
        _train(spec, device)


def _train(spec: LoopSpec, device: torch.device) -> None:
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from transformers import get_scheduler

    from selectmoe.model.precision import cast_model

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    distributed = world > 1 and dist.is_available() and dist.is_initialized()
    fsdp = spec.train.strategy == "fsdp" and distributed
    on_gpu = device.type == "cuda"
    _, per_epoch, n_total = total_steps(spec, world)
    rows = load_rows(ray.train.get_dataset_shard("train"), spec.n_rows)

    _seed_all(spec.train.seed)
    # frozen weights loaded in bf16 on a bf16 GPU run (the host never holds an fp32 copy; FSDP shards them
    # as they are and computes in bf16 by its policy); quality gates and routers stay fp32
    bf16 = on_gpu and spec.train.bf16
    model = spec.model_fn(torch.bfloat16 if bf16 else torch.float32)
    if bf16:
        cast_model(model, torch.bfloat16)  # whatever model_fn returned; the fp32 modules are never rounded
    _trainable_to_fp32(model)
    if spec.train.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable_names:
        raise ValueError("model_fn returned a model with no trainable parameters")

    state = _load_checkpoint(spec, model, rank, world)
    if fsdp:
        from selectmoe.training.fsdp import shard_model

        model = shard_model(model, device, bf16=on_gpu and spec.train.bf16)
        inner = model
    else:
        model = ray.train.torch.prepare_model(model, parallel_strategy="ddp" if distributed else None)
        inner = getattr(model, "module", model)
    named = dict(inner.named_parameters())
    params = [named[n] for n in trainable_names]
    optimizer = torch.optim.AdamW(params, lr=spec.train.lr, weight_decay=spec.train.weight_decay)
    scheduler = get_scheduler(
        spec.scheduler,
        optimizer,
        num_warmup_steps=math.ceil(spec.train.warmup_ratio * n_total),
        num_training_steps=n_total,
    )
    step, epoch, step_in_epoch = 0, 0, 0
    # persisted in state.json: tokens so far, the pre-training eval, the latest eval (in every report)
    carry: dict[str, Any] = {"tokens_seen": 0.0, "before": {}, "last_eval": {}}
    if state is not None:
        carry.update(state.get("carry") or {})
        _restore_optimizer(optimizer, scheduler, trainable_names, params, state)
        step, epoch, step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        logger.info(
            "rank %d resumed at step %d (epoch %d, step %d in epoch)", rank, step, epoch, step_in_epoch
        )

    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if on_gpu and spec.train.bf16
        else contextlib.nullcontext()
    )
    window = _Window(device)
    peak = _PeakMemory(device)  # from here on: after sharding, so it measures what training holds
    param_mb = sum(_local(p).numel() * p.element_size() for p in inner.parameters()) / 2**20
    reports = _ReportClock(controller_poll_s())
    history: list[dict[str, Any]] = []  # log-step metrics not reported yet
    last_metrics: dict[str, Any] = {}
    ckpt = _Checkpointer(spec, inner, optimizer, scheduler, trainable_names, rank, world)
    if spec.eval_before and state is None:
        before = _run_eval(spec, model, rank, distributed, fsdp)
        carry["before"] = {f"{k}_before": v for k, v in before.items()}
        carry["last_eval"] = dict(before)
    model.train()
    while step < n_total and epoch < spec.train.epochs:
        order = epoch_order(spec.n_rows, spec.train.seed, epoch, spec.shuffle)
        while step_in_epoch < per_epoch and step < n_total:
            _seed_all(spec.train.seed + 1_000_003 * (step + 1) + rank)
            mine = worker_rows(order, step_in_epoch, spec.train.batch_size, world, rank)
            group = [
                collate_rows(rows, mine[i : i + spec.train.micro_batch_size], spec.pad_token_id, device)
                for i in range(0, len(mine), spec.train.micro_batch_size)
            ]
            counts = _global_counts(group, spec.quality_token_scope, device, distributed)
            forward_backward(
                model,
                group,
                counts,
                count_kwargs=spec.count_kwargs,
                forward_kwargs=spec.forward_kwargs,
                loss_scale=world if distributed else 1,
                autocast=autocast,
                distributed=distributed,
                on_output=lambda out, mb: window.add_outputs(out, mb, spec.metrics_fn),
            )
            grad_norm = _full(torch.nn.utils.clip_grad_norm_(params, spec.train.max_grad_norm))
            window.add_step(float(grad_norm), float(counts["n_tokens"]))
            carry["tokens_seen"] += float(counts["n_tokens"])
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_in_epoch += 1
            epoch_end = step_in_epoch == per_epoch
            last = step == n_total
            evaluates = (epoch_end and spec.eval_fn is not None) or last
            _maybe_fail(spec.fail_once, step, rank)
            is_ckpt = step % spec.train.checkpoint_every == 0 or evaluates
            if not (is_ckpt or step % spec.train.log_every == 0):
                continue
            entry = window.flush(distributed)
            entry.update(step=step, lr=lr, epoch=round(step / per_epoch, 6), tokens_seen=carry["tokens_seen"])
            entry.update(peak_mem_mb=peak.mb(), param_mb=param_mb)  # this worker's (rank 0's)
            history.append(entry)
            if evaluates:
                carry["last_eval"] = _run_eval(spec, model, rank, distributed, fsdp) or carry["last_eval"]
                model.train()
            elif not (is_ckpt or reports.due(device, distributed)):
                continue
            # this step's metrics, the latest eval (Tune needs it in every report), the unreported log steps
            metrics = {**entry, **carry["before"], **carry["last_eval"], "log_history": history}
            after = (epoch + 1, 0) if epoch_end else (epoch, step_in_epoch)
            ckpt.report(metrics, with_ckpt=is_ckpt, step=step, after=after, carry=carry)
            reports.mark()
            history = []
            last_metrics = metrics
        epoch, step_in_epoch = epoch + 1, 0
    peak.stop()
    if not last_metrics:
        # Resumed from a final checkpoint: the run's result is that restored checkpoint with its metrics.
        # Report metrics only: the checkpoint again, under its own directory name, would be a second result
        # for the same directory, and Ray Train's num_to_keep deletes it as the oldest one on a later rerun.
        metrics = {"step": step, "epoch": round(step / per_epoch, 6), "tokens_seen": carry["tokens_seen"]}
        metrics.update(carry["before"])
        metrics.update(carry["last_eval"])
        ckpt.report(metrics, with_ckpt=False, step=step, after=(epoch, 0), carry=carry)


def epoch_order(n_rows: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The global row order of one epoch: a permutation seeded by ``(seed, epoch)`` (or file order).

    Every worker computes the same order; step ``t`` trains on rows ``order[t*B:(t+1)*B]`` whatever the
    world size, so resuming only needs the position and 1 worker sees the batches 4 workers would."""
    if not shuffle:
        return np.arange(n_rows)
    return np.random.default_rng([int(seed) % 2**32, int(epoch)]).permutation(n_rows)


def worker_rows(order: np.ndarray, step_in_epoch: int, batch_size: int, world: int, rank: int) -> np.ndarray:
    """This worker's rows of global batch ``step_in_epoch``: its contiguous ``batch_size / world`` slice."""
    per_worker = batch_size // world
    start = step_in_epoch * batch_size + rank * per_worker
    return order[start : start + per_worker]


def load_rows(shard, n_rows: int):
    """The whole encoded dataset as one Arrow table (``input_ids``/``labels``), in the dataset's order."""
    import pyarrow as pa

    batches = [
        b.select(["input_ids", "labels"]) for b in shard.iter_batches(batch_format="pyarrow", batch_size=4096)
    ]
    table = pa.concat_tables(batches) if batches else None
    got = 0 if table is None else table.num_rows
    if got != n_rows:
        raise ValueError(f"the training dataset has {got} rows, the loop was told {n_rows}")
    return table.combine_chunks()


def collate_rows(table, indices: np.ndarray, pad_token_id: int, device=None) -> dict[str, torch.Tensor]:
    """Rows ``indices`` of the Arrow table, padded (THE padding: ``data.encoding.pad_columns``)."""
    taken = table.take(indices)
    tensors = pad_columns(taken.column("input_ids"), taken.column("labels"), pad_token_id)
    return {k: v.to(device) for k, v in tensors.items()} if device is not None else tensors


def _trainable_to_fp32(model: torch.nn.Module) -> None:
    """Trainable tensors in fp32. A function, not an inline loop: a loop variable left in ``_train``'s frame
    keeps the last original parameter alive after FSDP replaced it, and with it the whole memory-mapped
    ``model.safetensors`` that sharding read (+300 MB resident per worker on the 112M benchmark)."""
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This worker's part of a DTensor (FSDP2 shard); a plain tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2 grads, norms, optimizer moments) gathered whole; a plain tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def forward_backward(
    model,
    group: list[dict[str, torch.Tensor]],
    counts: dict[str, torch.Tensor],
    *,
    count_kwargs: tuple[str, ...] = (),
    forward_kwargs: dict[str, Any] | None = None,
    loss_scale: float = 1.0,
    autocast=None,
    distributed: bool = False,
    on_output: Callable[[Any, dict[str, torch.Tensor]], Any] | None = None,
) -> torch.Tensor:
    """Forward + backward of one optimizer step's micro-batches (gradients accumulate; no optimizer step).

    Every forward gets the step's *global* counts (``num_items_in_batch`` + ``count_kwargs``), so the summed
    micro-batch losses / gradients equal one forward over the whole global batch. ``loss_scale`` is the
    world size under DDP (which averages gradients over workers). Returns the summed (unscaled) loss, detached.
    """
    total = torch.zeros((), dtype=torch.float32)
    n = len(group)
    for i, mb in enumerate(group):
        sync = i == n - 1 or not distributed
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter after the last one only
            model.set_requires_gradient_sync(sync)
            sync = True
        elif not hasattr(model, "no_sync"):
            sync = True
        with contextlib.nullcontext() if sync else model.no_sync(), autocast or contextlib.nullcontext():
            out = model(
                input_ids=mb["input_ids"],
                attention_mask=mb["attention_mask"],
                labels=mb["labels"],
                num_items_in_batch=counts["num_items_in_batch"],
                **{k: counts[k] for k in count_kwargs},
                **(forward_kwargs or {}),
            )
            loss = out.loss * loss_scale if loss_scale != 1 else out.loss
        loss.backward()
        total = total.to(out.loss.device) + out.loss.detach().float()
        if on_output is not None:
            on_output(out, mb)
    return total


def global_counts(group, scope: str = "all") -> dict[str, torch.Tensor]:
    """The step's global counts for micro-batches ``group`` on one process (see ``_global_counts``)."""
    return _global_counts(group, scope, group[0]["input_ids"].device, False)


def _seed_all(seed: int) -> None:
    import random

    seed = seed % (2**32)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _maybe_fail(fail_once: str | None, step: int, rank: int) -> None:
    if not fail_once or rank != 0:
        return
    at, marker = fail_once.split(":", 1)
    if step == int(at) and not Path(marker).exists():
        Path(marker).write_text(f"failed once at step {step}\n")
        raise RuntimeError(f"injected failure at step {step} ({FAIL_ONCE_ENV})")


def quality_token_mask(attention_mask: torch.Tensor, labels: torch.Tensor, scope: str) -> torch.Tensor:
    """The tokens the quality loss counts (THE definition: ``selectmoe.model.stats.token_mask_for_scope``)."""
    from selectmoe.model.stats import token_mask_for_scope

    return token_mask_for_scope(attention_mask, labels, scope)


def _global_counts(group, scope: str, device, distributed: bool) -> dict[str, torch.Tensor]:
    import torch.distributed as dist

    local = torch.zeros(4, dtype=torch.float64, device=device)
    for mb in group:
        local[0] += (mb["labels"][:, 1:] != IGNORE_INDEX).sum()  # causal shift: position 0 is never a target
        qmask = quality_token_mask(mb["attention_mask"], mb["labels"], scope)
        local[1] += qmask.any(1).sum()  # samples with >= 1 scoped token (how the quality loss counts them)
        local[2] += qmask.sum()
        local[3] += mb["attention_mask"].sum()
    if distributed:
        dist.all_reduce(local)
    n_items, n_samples, n_quality, n_tokens = (local[i].to(torch.int64) for i in range(4))
    return {
        "num_items_in_batch": n_items.clamp_min(1),
        "num_samples_in_batch": n_samples,
        "num_quality_tokens_in_batch": n_quality.clamp_min(1),
        "n_tokens": n_tokens,
    }


class _Window:
    """Sums of per-step metrics between two reports (losses are already normalised by global counts)."""

    def __init__(self, device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.tokens = 0.0
        self.grad_norm = 0.0
        self.t0 = time.perf_counter()

    def _add(self, key: str, value: torch.Tensor, count: torch.Tensor | float = 1.0) -> None:
        value = value.detach().double().to(self.device)
        count = torch.as_tensor(count, dtype=torch.float64, device=self.device)
        self.sums[key] = self.sums.get(key, 0) + value
        self.counts[key] = self.counts.get(key, 0) + count

    def add_outputs(self, out, mb, metrics_fn) -> None:
        for key in ("loss", "lm_loss", "quality_loss", "aux_loss"):
            value = getattr(out, key, None)
            if isinstance(value, torch.Tensor):
                self._add(key, value, 0.0)  # per-step sums; divided by steps in flush
        if metrics_fn is not None:
            for key, (s, c) in metrics_fn(out, mb).items():
                self._add(key, s, c)

    def add_step(self, grad_norm: float, tokens: float) -> None:
        self.steps += 1
        self.tokens += tokens
        self.grad_norm += grad_norm

    def flush(self, distributed: bool) -> dict[str, Any]:
        import torch.distributed as dist

        keys = sorted(self.sums)
        if keys:
            sums = torch.stack(
                [self.sums[k].reshape(-1)[0] if self.sums[k].dim() else self.sums[k] for k in keys]
            )
            counts = torch.stack([torch.as_tensor(self.counts[k], dtype=torch.float64) for k in keys])
            vec = torch.cat([sums, counts.to(sums.device)])
            if distributed:
                dist.all_reduce(vec)
            sums, counts = vec[: len(keys)], vec[len(keys) :]
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        metrics: dict[str, Any] = {}
        for i, key in enumerate(keys):
            # losses: global per-step values summed over workers -> mean over steps; others: sum / count
            value = sums[i] / self.steps if counts[i] == 0 else sums[i] / counts[i]
            metrics[key] = float(value)
        metrics["grad_norm"] = self.grad_norm / max(self.steps, 1)
        metrics["tokens_per_s"] = self.tokens / elapsed  # global tokens (all workers) per second
        self.reset()
        return metrics


class _PeakMemory:
    """Peak memory of this worker since training started: CUDA's allocator peak on GPU; on CPU the peak
    resident set, sampled every 20 ms by a daemon thread (``ru_maxrss`` would include the full model that
    every rank builds before FSDP shards it)."""

    def __init__(self, device) -> None:
        import threading

        self.cuda = device.type == "cuda"
        self.peak = 0
        self._done = threading.Event()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
            return
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._sample()
        threading.Thread(target=self._run, daemon=True, name="selectmoe-peak-rss").start()

    def _sample(self) -> None:
        try:
            with open("/proc/self/statm", encoding="ascii") as fh:
                self.peak = max(self.peak, int(fh.read().split()[1]) * self._page)
        except OSError:  # not Linux: the process peak is the best there is
            import resource

            self.peak = max(self.peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)

    def _run(self) -> None:
        while not self._done.wait(0.02):
            self._sample()

    def mb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        self._sample()
        return self.peak / 2**20

    def stop(self) -> None:
        self._done.set()


def resolve_storage(storage_path: str) -> str:
    """Ray Train's ``storage_path``: a URI as given, a local path made absolute."""
    return str(storage_path) if storage.is_uri(storage_path) else str(Path(storage_path).resolve())


def metrics_log_callback(run_dir: str | Path, *, storage_path: str, name: str):
    """A Ray Train ``UserCallback`` appending every log step's metrics (rank 0's) to ``run_dir/METRICS_LOG``
    (JSONL): the ``log_history`` rows of each report, then the reported step's row with its eval values.

    A fresh Ray run (no ``storage_path/name`` yet) starts a fresh log; a restored one appends. The callback
    runs in the Train controller, which Ray pins to the driver's node, so a local path is fine.
    """
    from ray.train import UserCallback

    path = Path(run_dir) / METRICS_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    if storage.is_uri(storage_path) or not (Path(storage_path) / name).exists():
        path.unlink(missing_ok=True)

    class _MetricsLog(UserCallback):
        def __init__(self, log_path: str) -> None:
            self.log_path = log_path

        def after_report(self, run_context, metrics, checkpoint) -> None:
            if not metrics:
                return
            report = metrics[0]
            history = list(report.get("log_history") or [])
            rows = [*history[:-1], {k: v for k, v in report.items() if k != "log_history"}]
            with open(self.log_path, "a", encoding="utf-8") as fh:
                for row in rows:
                    plain = {k: v for k, v in row.items() if isinstance(v, (int, float, str, bool))}
                    fh.write(json.dumps(plain) + "\n")

    return _MetricsLog(str(path))


def controller_poll_s() -> float:
    """Ray Train's controller poll period: ``ray.train.report`` hands over one result per worker per poll."""
    return float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0"))


class _ReportClock:
    """Is a log-step report due? Rank 0's clock decides (broadcast): every rank reports at the same steps."""

    def __init__(self, min_interval_s: float) -> None:
        self.min_interval_s = float(min_interval_s)
        self.last = time.perf_counter()

    def due(self, device, distributed: bool) -> bool:
        import torch.distributed as dist

        elapsed = time.perf_counter() - self.last
        flag = torch.tensor([elapsed >= self.min_interval_s], dtype=torch.uint8, device=device)
        if distributed:
            dist.broadcast(flag, src=0)
        return bool(flag.item())

    def mark(self) -> None:
        self.last = time.perf_counter()


def _run_eval(spec: LoopSpec, model, rank: int, distributed: bool, fsdp: bool) -> dict[str, float]:
    """``eval_fn`` on rank 0 (DDP) or on every rank (FSDP: each forward all-gathers the shards, so every
    rank runs the same forwards); rank 0's values are broadcast."""
    import torch.distributed as dist

    if spec.eval_fn is None:
        return {}
    result: list[Any] = [None]
    if rank == 0 or fsdp:
        inner = model if fsdp else getattr(model, "module", model)
        inner.eval()
        on_gpu = next(inner.parameters()).device.type == "cuda"
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else contextlib.nullcontext()
        with torch.no_grad(), autocast:
            result[0] = {k: float(v) for k, v in spec.eval_fn(inner).items()}
    if distributed:
        dist.broadcast_object_list(result, src=0)  # in-memory only; nothing pickled to disk
    return result[0] or {}


# ---------------------------------------------------------------------------------------- checkpointing


@dataclass
class _Checkpointer:
    """Reports (with a checkpoint on checkpoint steps). Checkpoints hold full tensors, written by rank 0:
    under FSDP every rank takes part in gathering the shards (``full_tensor``), so a checkpoint does not
    depend on how the run was sharded."""

    spec: LoopSpec
    inner: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    names: list[str]
    rank: int
    world: int

    def report(self, metrics, *, with_ckpt: bool, step: int, after: tuple[int, int], carry) -> None:
        import ray.train

        if not with_ckpt:
            ray.train.report(metrics)
            return
        trainable = {k: _full(v.detach()) for k, v in self.spec.export_fn(self.inner).items()}
        moments = {
            f"{self.names[idx]}::{key}": _full(value.detach())
            for idx, pstate in self.optimizer.state_dict()["state"].items()
            for key, value in pstate.items()
            if isinstance(value, torch.Tensor)
        }
        with tempfile.TemporaryDirectory(prefix="selectmoe-ckpt-") as tmp:
            checkpoint = None
            if self.rank == 0:
                self._write(Path(tmp), trainable, moments, step, after, carry)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{step:08d}")

    def _write(self, tmp: Path, trainable, moments, step, after, carry) -> None:
        from safetensors.torch import save_file

        plain = {k: v.float().cpu().contiguous() for k, v in trainable.items()}
        save_file(plain, str(tmp / TRAINABLE_FILE))
        save_file({k: v.cpu().contiguous() for k, v in moments.items()}, str(tmp / OPTIMIZER_FILE))
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        state = {
            "step": step,
            "epoch": after[0],
            "step_in_epoch": after[1],
            "world_size": self.world,
            "batch_size": self.spec.train.batch_size,
            "micro_batch_size": self.spec.train.micro_batch_size,
            "param_names": self.names,
            "optimizer_param_groups": jsonable(groups),
            "scheduler": jsonable(self.scheduler.state_dict()),
            "carry": jsonable(carry),
        }
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))


def _load_checkpoint(spec: LoopSpec, model, rank: int, world: int) -> dict[str, Any] | None:
    """Load trainable tensors into ``model`` (before DDP wrap / FSDP sharding); returns the state or None."""
    import ray.train
    from safetensors.torch import load_file

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and spec.resume_from:
        checkpoint = ray.train.Checkpoint(spec.resume_from)
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        d = Path(d)
        state = json.loads((d / STATE_FILE).read_text())
        if (state["world_size"], state["batch_size"], state["micro_batch_size"]) != (
            world,
            spec.train.batch_size,
            spec.train.micro_batch_size,
        ):
            raise ValueError(
                f"checkpoint {checkpoint.path} was written with world_size={state['world_size']}, "
                f"batch_size={state['batch_size']}, micro_batch_size={state['micro_batch_size']}; resuming "
                f"needs the same (got {world}, {spec.train.batch_size}, {spec.train.micro_batch_size})"
            )
        spec.import_fn(model, load_file(str(d / TRAINABLE_FILE)))
        state["optimizer_tensors"] = load_file(str(d / OPTIMIZER_FILE))
    return state


def _restore_optimizer(optimizer, scheduler, names: list[str], params, state: dict[str, Any]) -> None:
    """AdamW moments from full tensors; a sharded (DTensor) parameter gets its moments sharded alike."""
    index = {n: i for i, n in enumerate(names)}
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state["optimizer_tensors"].items():
        name, field_name = key.rsplit("::", 1)
        i = index[name]
        param = params[i]
        if hasattr(param, "device_mesh") and value.dim() > 0:
            from torch.distributed.tensor import distribute_tensor

            value = distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
        per_param.setdefault(i, {})[field_name] = value
    current = optimizer.state_dict()
    groups = []
    for group, saved in zip(current["param_groups"], state["optimizer_param_groups"], strict=True):
        restored = {**group, **saved, "params": group["params"]}
        if "betas" in restored:
            restored["betas"] = tuple(restored["betas"])
        groups.append(restored)
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    scheduler.load_state_dict(state["scheduler"])
