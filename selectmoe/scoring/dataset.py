"""The score stage's Ray Data pipeline (lazy; the driver consumes it, :mod:`selectmoe.scoring.writer`).

::

    read_ingested(shard) + "_shard" column   (read tasks, one dataset per pending shard, unioned)
      -> encode_and_bucket                     (CPU tasks, its own stage so the next batches are ready
                                                while the model runs: THE encoder with the selector's
                                                EncodingSpec + the answer's text signals and the
                                                question's prompt key over a
                                                window of ``sort_window`` rows, sorted
                                                by length and cut into ``batch_size``-row blocks -> little
                                                padding, enough blocks for every replica)
      -> RouterScorer                          (actor pool of ``num_replicas`` replicas holding the model;
                                                ``num_gpus_per_replica`` GPUs each, else CPU replicas)
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from selectmoe.config import ScoreConfig
from selectmoe.data.records import prompt_key
from selectmoe.router_data import PROMPT_KEY, TEXT_COLUMNS
from selectmoe.scoring.model import assistant_only, response_spec
from selectmoe.scoring.records import shard_name
from selectmoe.scoring.scorer import SHARD_COLUMN, RouterScorer
from selectmoe.scoring.text_signals import text_signals

logger = logging.getLogger(__name__)

_PASS_COLUMNS = (
    "id", "dataset", "n_tokens", "truncated", "full_tokens", "input_ids", "labels", "response_labels",
    "answer_input_ids", "answer_labels", SHARD_COLUMN, PROMPT_KEY, *TEXT_COLUMNS,
)  # fmt: skip


def read_encoding_spec(model_dir: str | Path) -> dict[str, Any]:
    """The EncodingSpec dict the selector was trained with (defaults for a plain model dir), read from the
    artefact without loading the model (``load_selector`` returns the same dict on the replicas)."""
    from selectmoe.data.encoding import EncodingSpec
    from selectmoe.model.artifact import selector_encoding

    return selector_encoding(model_dir) or EncodingSpec().to_dict()


def add_shard_column(batch: pa.Table, *, name: str) -> pa.Table:
    return batch.append_column(SHARD_COLUMN, pa.array([name] * batch.num_rows, pa.string()))


def bucket_by_length(batch: pa.Table, *, batch_size: int) -> Iterator[pa.Table]:
    """Sort one window by token count (longest first: memory trouble shows on the first batch) and emit
    ``batch_size``-row blocks, so every model batch holds samples of similar length."""
    keep = [c for c in _PASS_COLUMNS if c in batch.column_names]
    batch = batch.select(keep)
    order = pc.sort_indices(batch, sort_keys=[("n_tokens", "descending"), ("id", "ascending")])
    batch = batch.take(order)
    for start in range(0, batch.num_rows, batch_size):
        yield batch.slice(start, batch_size)


def encode_and_bucket(
    batch: pa.Table, *, tokenizer_dir: str, spec: Mapping[str, Any], batch_size: int, ifd: bool = False
) -> Iterator[pa.Table]:
    """CPU stage before the model (Ray tasks): THE encoder (:func:`cached_encoder`, built once per worker
    process) over a window of ``sort_window`` rows, the response labels (same text, labels on
    the assistant tokens) and, with ``ifd``, the answer-only encoding, then :func:`bucket_by_length`.
    Tasks rather than an actor pool: they spread over every free CPU, overlap with the model replicas, and
    their worker processes (tokenizer already loaded) are reused by the next run instead of starting a
    new actor."""
    from selectmoe.data.ray_io import _messages_column, cached_encoder

    encoded = cached_encoder(tokenizer_dir, spec)(batch)
    conversations = _messages_column(batch)
    resp = cached_encoder(tokenizer_dir, response_spec(spec))
    by_response = resp.encoder.encode_many(conversations)
    response_labels = [e.labels for e in by_response]
    encoded = encoded.append_column("response_labels", pa.array(response_labels, pa.list_(pa.int32())))
    answers = ["\n".join(m.get("content", "") for m in assistant_only(c)) for c in conversations]
    eos_id = resp.encoder.tokenizer.eos_token_id
    signals = text_signals(encoded.column("input_ids").to_pylist(), response_labels, answers, eos_id=eos_id)
    for name in TEXT_COLUMNS:
        encoded = encoded.append_column(name, pa.array(signals[name], pa.float32()))
    encoded = encoded.append_column(PROMPT_KEY, pa.array([prompt_key(c) for c in conversations], pa.int64()))
    if ifd:
        answers = resp.encoder.encode_many([assistant_only(c) for c in conversations])
        encoded = encoded.append_column(
            "answer_input_ids", pa.array([e.input_ids for e in answers], pa.list_(pa.int32()))
        ).append_column("answer_labels", pa.array([e.labels for e in answers], pa.list_(pa.int32())))
    yield from bucket_by_length(encoded, batch_size=batch_size)


# A CPU replica's smallest share of a CPU: the read/encode tasks need one whole CPU beside the replicas.
MIN_CPU_PER_REPLICA = 0.25


def cpu_replica_plan(cpus: float, requested: int) -> tuple[int, float, list[str]]:
    """``(replicas, num_cpus each, notices)`` for CPU scoring on a cluster of ``cpus`` CPUs.

    Never a hang: Ray Data's read tasks take one CPU, so replicas may hold at most ``cpus - 1`` of them;
    more replicas than fit at :data:`MIN_CPU_PER_REPLICA` each run as fewer (a one-line notice naming
    the key), and a cluster without that spare CPU is refused in one line (it would wait forever with
    ``backpressured:tasks(ResourceBudget)``)."""
    requested = max(1, int(requested))
    spare = cpus - 1.0
    if spare < MIN_CPU_PER_REPLICA:
        raise ValueError(
            f"score.num_replicas: the Ray cluster has {cpus:g} CPU(s); CPU scoring needs at least "
            f"{1 + MIN_CPU_PER_REPLICA:g} (one for reading and encoding, the rest for the model replicas)"
        )
    fits = max(1, int(spare / MIN_CPU_PER_REPLICA + 1e-9))
    notices = []
    if requested > fits:
        notices.append(
            f"score.num_replicas={requested}: the Ray cluster has {cpus:g} CPU(s); running {fits} replicas"
        )
    replicas = min(requested, fits)
    return replicas, max(MIN_CPU_PER_REPLICA, min(1.0, spare / replicas)), notices


def replica_resources(
    cfg: ScoreConfig, use_gpu: bool
) -> tuple[dict[str, Any], dict[str, Any], int | None, int]:
    """(scorer remote args, encoder-task remote args, scorer torch threads, replicas)."""
    from selectmoe.ray_utils import cluster_cpus, largest_node_cpus

    cpus = cluster_cpus()
    encode_args = {"num_cpus": 0.5}
    if use_gpu:
        replicas = max(1, cfg.num_replicas)
        return {"num_gpus": float(cfg.num_gpus_per_replica), "num_cpus": 1}, encode_args, None, replicas
    # CPU replicas: leave a CPU for the read/encode tasks or the pipeline starves. The replicas' num_cpus
    # must differ from the encode tasks' (0.5): Ray Data fuses a task map into the next actor map when
    # their remote args are equal, which would put tokenisation back on the model actors.
    replicas, per_replica, notices = cpu_replica_plan(cpus, cfg.num_replicas)
    for line in notices:
        logger.warning(line)
    if per_replica == encode_args["num_cpus"]:
        per_replica = 0.45
    # torch threads: the CPUs the encode tasks leave, shared by the replicas, and never more than a node
    # has. A lone replica takes every CPU of its node: encoding is a small share of the work and runs in
    # bursts between batches, so the CPU reserved for it idles most of the time (Gemma-3-270M on 2 cores:
    # 0.79 s a row with 2 threads, 1.44 s with 1; docs/benchmarks.md).
    spare = cpus if replicas == 1 else cpus - 1
    threads = max(1, min(int(largest_node_cpus()), int(spare // replicas)))
    return {"num_cpus": per_replica}, encode_args, threads, replicas


def build_score_dataset(
    cfg: ScoreConfig,
    shards: Sequence[Path],
    *,
    use_gpu: bool,
    encoding: Mapping[str, Any],
    crash_once_marker: str | None = None,
    scorer_cls: type = RouterScorer,
    scorer_kwargs: Mapping[str, Any] | None = None,
    with_scorer: bool = True,
):
    """The lazy Ray Dataset for ``shards`` (``with_scorer=False``: stop before the model, for benchmarks)."""
    from ray.data import ActorPoolStrategy

    from selectmoe.data.ray_io import read_ingested
    from selectmoe.model.artifact import selector_tokenizer_dir

    parts = [
        read_ingested(cfg.ingest_dir, shards=[str(p)]).map_batches(
            functools.partial(add_shard_column, name=shard_name(p)), batch_format="pyarrow"
        )
        for p in shards
    ]
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    scorer_args, encode_args, threads, replicas = replica_resources(cfg, use_gpu)
    ds = ds.map_batches(
        functools.partial(
            encode_and_bucket,
            tokenizer_dir=str(selector_tokenizer_dir(cfg.model_dir)),
            spec=dict(encoding),
            batch_size=int(cfg.batch_size),
            ifd=bool(cfg.ifd),
        ),
        batch_format="pyarrow",
        batch_size=max(int(cfg.sort_window), int(cfg.batch_size)),
        **encode_args,
    )
    # Blocks of ``batch_size`` rows (a streaming repartition, fused into the encode tasks): without it
    # Ray Data coalesces a task's outputs into ~128 MiB blocks, so one replica would get the whole pool
    # and the driver would see nothing until the end. Small blocks keep every replica busy and let the
    # driver close shards as they finish.
    ds = ds.repartition(target_num_rows_per_block=int(cfg.batch_size))
    if not with_scorer:
        return ds
    kwargs = {
        "model_dir": str(cfg.model_dir),
        "dtype": cfg.dtype,
        "use_gpu": use_gpu,
        "num_threads": threads,
        "crash_once_marker": crash_once_marker,
        **dict(scorer_kwargs or {}),
    }
    return ds.map_batches(
        scorer_cls,
        fn_constructor_kwargs=kwargs,
        batch_format="pyarrow",
        batch_size=int(cfg.batch_size),
        # Ray Data's actor pools default to max_restarts=-1 / max_task_retries=-1: a killed replica is
        # restarted and its in-flight batches are retried (tests/test_score.py kills one).
        compute=ActorPoolStrategy(size=replicas),
        **scorer_args,
    )
