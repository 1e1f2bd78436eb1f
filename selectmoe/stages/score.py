"""Score stage: router inference over the whole ingested pool on Ray Data -> router-data Parquet shards.

Pipeline (one Ray Data execution over every *pending* ingest shard)::

    read_ingested(shard) + "_shard" column   (read tasks, one dataset per pending shard, unioned)
      -> encode_and_bucket                     (CPU tasks, its own stage so the next batches are ready
                                                while the model runs: THE encoder (EncodeBatch) with the
                                                selector's EncodingSpec over a window of ``sort_window``
                                                rows, sorted by length and cut into ``batch_size``-row
                                                blocks -> little padding, enough blocks for every replica)
      -> RouterScorer                          (actor pool of ``num_replicas`` replicas holding the model;
                                                ``num_gpus_per_replica`` GPUs each, else CPU replicas;
                                                ``torch.inference_mode``, bf16 on GPU, fp32 reductions)
      -> driver: iter_batches -> one RouterDataWriter per shard -> verify -> ``<name>.done.json``

Why one pipeline with a shard column and driver-side writers (and not one pipeline per shard or a custom
Datasink): the model replicas are loaded once for the whole pool (a pipeline per shard would restart the
actor pool, i.e. reload a 7B model, for every shard), and the driver is the single place that sees every
row of a shard, so it can drop a row delivered twice by a retried task, count rows, close the shard the
moment its last row arrives and check ``rows == ingest rows`` and ``id set == ingest id set`` *before*
marking it done. A Datasink writes per block on workers, which could neither dedupe across retried
blocks nor know when a shard is complete. Memory: the driver holds only the open shards' Parquet writers
(each batch is flushed as a row group) and their id sets; the pool itself is streamed.

Per sample, from ONE forward pass: the gate score + routing features and the base perplexity anchors
(``response_nll`` over the assistant tokens, ``sample_nll`` over all); ``score.ifd=true`` adds a second,
shorter pass of the answer alone for IFD. Memory: the NLL needs the full ``[batch_size, T, vocab]`` logits
(model dtype; each row is reduced in fp32), e.g. 32 x 1024 x 50k bf16 = 3.3 GB on OLMoE: lower
``score.batch_size`` if a replica runs out of memory.

Idempotence / resume: an output shard counts as done only when ``shards/<name>.parquet`` exists and
``shards/<name>.done.json`` records the same input fingerprint, model fingerprint + scoring settings,
row count and output checksum. A rerun skips those; everything else is (re)scored from scratch (the
writer is atomic: a killed run leaves no half shard). Output shards whose ingest shard no longer exists
are removed, so the router dir always mirrors the current pool. A scorer actor that dies is restarted
and its task retried by Ray (``max_restarts`` / ``max_task_retries``); a killed driver is a rerun.

Test hooks (read on the driver only): ``SELECTMOE_SCORE_CRASH_ONCE=<marker>`` makes a scorer replica
hard-exit (``os._exit``, like a killed actor) on its first batch if ``<marker>`` does not exist yet (it is
created first); ``SELECTMOE_SCORE_STOP_AFTER_SHARDS=<n>`` makes the driver raise after ``n`` shards were
completed (a killed job).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from selectmoe.config import ScoreConfig
from selectmoe.manifest import fingerprint, read_manifest, write_manifest
from selectmoe.router_data import SHARD_DIR, RouterDataWriter

logger = logging.getLogger(__name__)

SCORE_FORMAT_VERSION = 2  # 2: response_nll, sample_nll, ifd columns
DONE_SUFFIX = ".done.json"
SHARD_COLUMN = "_shard"
CRASH_ONCE_ENV = "SELECTMOE_SCORE_CRASH_ONCE"
STOP_AFTER_ENV = "SELECTMOE_SCORE_STOP_AFTER_SHARDS"
IGNORE_INDEX = -100
_PASS_COLUMNS = (
    "id", "dataset", "n_tokens", "truncated", "input_ids", "labels", "response_labels",
    "answer_input_ids", "answer_labels", SHARD_COLUMN,
)  # fmt: skip


class ScoreInterrupted(RuntimeError):
    """Raised by the ``SELECTMOE_SCORE_STOP_AFTER_SHARDS`` test hook."""


@dataclass
class ScoreResult:
    output_dir: str
    rows: int  # rows in the router data now (all shards)
    rows_scored: int  # rows scored by this run
    tokens_scored: int  # tokens scored by this run
    rejected: int  # rows ingest rejected (listed in rejected_path with file/line/reason)
    rejected_path: str
    shards_scored: list[str] = field(default_factory=list)
    shards_skipped: list[str] = field(default_factory=list)
    model_fingerprint: str = ""
    tokens_per_s: float = 0.0
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out["shards_scored"] = len(self.shards_scored)
        out["shards_skipped"] = len(self.shards_skipped)
        return out


# ----------------------------------------------------------------------------------------------- model side


def resolve_dtype(name: str, use_gpu: bool):
    import torch

    if name == "auto":
        return torch.bfloat16 if use_gpu else torch.float32
    if name in ("bfloat16", "bf16"):
        return torch.bfloat16
    if name in ("float32", "fp32"):
        return torch.float32
    raise ValueError(f"score.dtype must be auto | bfloat16 | float32, got {name!r}")


def pad_lists(values: pa.Array | pa.ChunkedArray, pad_value: int) -> np.ndarray:
    """Right-pad an Arrow ``list<int>`` column into an int64 ``[B, T]`` matrix (vectorised, no Python loop)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    offsets = values.offsets.to_numpy()
    lengths = np.diff(offsets)
    flat = values.flatten().to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    width = int(lengths.max()) if len(lengths) else 0
    out = np.full((len(lengths), width), pad_value, dtype=np.int64)
    out[np.arange(width)[None, :] < lengths[:, None]] = flat  # row-major fill == concatenation order
    return out


def mean_token_nll(logits, targets) -> np.ndarray:
    """Per-sample mean next-token NLL (fp32) over positions whose target is not ``IGNORE_INDEX``.

    ``logits [B, T, V]`` predict ``targets [B, T]`` shifted by one (HF causal-LM convention). Row by row in
    fp32 so memory stays ``T x V`` beyond the logits themselves; a row without any target gets NaN."""
    import torch
    import torch.nn.functional as F

    out = np.full(logits.shape[0], np.nan, dtype=np.float32)
    shifted = targets[:, 1:]
    for i in range(logits.shape[0]):
        tgt = shifted[i]
        keep = tgt != IGNORE_INDEX
        if bool(keep.any()):
            row = logits[i, :-1][keep].to(torch.float32)
            out[i] = float(F.cross_entropy(row, tgt[keep].to(row.device), reduction="mean"))
    return out


def score_batch(
    model, input_ids, attention_mask, labels, *, scope: str, response_labels=None
) -> dict[str, np.ndarray]:
    """Per-sample statistics of one padded batch, all from ONE forward pass (the scoring function itself).

    Returns fp32 numpy ``quality [B]`` (the gate), ``quality_layers [B, L]``, ``routing [B, L*E]``,
    ``sample_nll [B]`` (mean NLL of every token after the first) and ``response_nll [B]`` (mean NLL of the
    tokens ``response_labels`` marks, i.e. the assistant turns; NaN when ``response_labels`` is None or
    marks nothing). Reductions are fp32 whatever the model dtype; only label/pad-masked tokens count, so a
    sample scores the same alone and inside a right-padded batch.
    """
    import torch

    from selectmoe.model import router_sample_stats, token_mask_for_scope

    with torch.inference_mode():
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True)
        mask = token_mask_for_scope(attention_mask, labels, scope)
        quality, quality_layers, routing = router_sample_stats(out.router_logits, mask)
        sample_targets = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        sample_nll = mean_token_nll(out.logits, sample_targets)
        response_nll = (
            mean_token_nll(out.logits, response_labels)
            if response_labels is not None
            else np.full(input_ids.shape[0], np.nan, np.float32)
        )
    return {
        "quality": quality.float().cpu().numpy(),
        "quality_layers": quality_layers.float().cpu().numpy(),
        "routing": routing.float().cpu().numpy(),
        "sample_nll": sample_nll,
        "response_nll": response_nll,
    }


def answer_only_nll(model, input_ids, attention_mask, labels) -> np.ndarray:
    """L(A): the response's mean NLL with the question left out (the IFD denominator; one more pass)."""
    import torch

    with torch.inference_mode():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        return mean_token_nll(logits, labels)


def assistant_only(messages: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The conversation without its question: only the assistant turns (IFD's L(A))."""
    return [m for m in messages if m.get("role") == "assistant"]


def response_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The EncodingSpec whose labels mark the response (assistant) tokens; same text, same tokens."""
    return {**dict(spec), "label_mode": "assistant_only"}


class RouterScorer:
    """``map_batches`` callable class: one model replica (an actor) scoring pyarrow batches."""

    def __init__(
        self,
        model_dir: str,
        *,
        dtype: str = "auto",
        use_gpu: bool = False,
        num_threads: int | None = None,
        crash_once_marker: str | None = None,
    ):
        import torch

        if num_threads:
            torch.set_num_threads(int(num_threads))
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.dtype = resolve_dtype(dtype, use_gpu)
        self.crash_once_marker = crash_once_marker
        self.model, tokenizer = self._load(model_dir)
        self.model.eval()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)
        self.scope = getattr(self.model.config, "quality_token_scope", "all")
        self.num_layers, self.num_experts = _model_shape(self.model.config)

    def _load(self, model_dir: str):
        from selectmoe.model import load_selector

        model, tokenizer, _ = load_selector(model_dir, dtype=self.dtype, device=self.device)
        return model, tokenizer

    def _padded(self, batch: pa.Table, ids_col: str, labels_col: str):
        """Right-padded ``(input_ids, attention_mask, labels)`` tensors of two list columns, on the device."""
        import torch

        input_ids = torch.from_numpy(pad_lists(batch.column(ids_col), self.pad_id))
        labels = torch.from_numpy(pad_lists(batch.column(labels_col), IGNORE_INDEX))
        lengths = np.diff(batch.column(ids_col).combine_chunks().offsets.to_numpy())
        attention_mask = torch.from_numpy(
            (np.arange(input_ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
        )
        nb = self.device.type == "cuda"
        return tuple(t.to(self.device, non_blocking=nb) for t in (input_ids, attention_mask, labels))

    def tensors(self, batch: pa.Table):
        return self._padded(batch, "input_ids", "labels")

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.crash_once_marker and not os.path.exists(self.crash_once_marker):
            Path(self.crash_once_marker).touch()
            logger.warning("test hook: scorer replica exits hard (simulated kill)")
            os._exit(1)
        input_ids, attention_mask, labels = self.tensors(batch)
        response = None
        if "response_labels" in batch.column_names:
            response = self._padded(batch, "input_ids", "response_labels")[2]
        stats = score_batch(
            self.model, input_ids, attention_mask, labels, scope=self.scope, response_labels=response
        )
        n = batch.num_rows
        ifd = np.full(n, np.nan, np.float32)
        if "answer_input_ids" in batch.column_names:
            # IFD = L(A|Q) / L(A): > 1 means the question does not help predict the answer (misaligned).
            ifd = stats["response_nll"] / answer_only_nll(
                self.model, *self._padded(batch, "answer_input_ids", "answer_labels")
            )
        return pa.table(
            {
                "id": batch.column("id"),
                "dataset": batch.column("dataset"),
                "n_tokens": pc.cast(batch.column("n_tokens"), pa.int32()),
                "truncated": batch.column("truncated"),
                SHARD_COLUMN: batch.column(SHARD_COLUMN),
                "quality": pa.array(stats["quality"].astype(np.float32)),
                "response_nll": pa.array(stats["response_nll"].astype(np.float32)),
                "sample_nll": pa.array(stats["sample_nll"].astype(np.float32)),
                "ifd": pa.array(ifd.astype(np.float32)),
                "quality_layers": pa.FixedSizeListArray.from_arrays(
                    pa.array(stats["quality_layers"].astype(np.float32).reshape(-1)), self.num_layers
                ),
                "routing": pa.FixedSizeListArray.from_arrays(
                    pa.array(stats["routing"].reshape(n, -1).astype(np.float16).reshape(-1), pa.float16()),
                    self.num_layers * self.num_experts,
                ),
            }
        )


def _model_shape(config) -> tuple[int, int]:
    layers = int(config.num_hidden_layers)
    experts = int(getattr(config, "num_experts", 0) or getattr(config, "num_local_experts", 0))
    return layers, experts


# ------------------------------------------------------------------------------------------ pipeline pieces


def _add_shard_column(batch: pa.Table, *, name: str) -> pa.Table:
    return batch.append_column(SHARD_COLUMN, pa.array([name] * batch.num_rows, pa.string()))


def _bucket_by_length(batch: pa.Table, *, batch_size: int) -> Iterator[pa.Table]:
    """Sort one window by token count (longest first: memory trouble shows on the first batch) and emit
    ``batch_size``-row blocks, so every model batch holds samples of similar length."""
    keep = [c for c in _PASS_COLUMNS if c in batch.column_names]
    batch = batch.select(keep)
    order = pc.sort_indices(batch, sort_keys=[("n_tokens", "descending"), ("id", "ascending")])
    batch = batch.take(order)
    for start in range(0, batch.num_rows, batch_size):
        yield batch.slice(start, batch_size)


@functools.lru_cache(maxsize=4)
def _cached_encoder(tokenizer_dir: str, spec_json: str):
    from selectmoe.data.ray_io import EncodeBatch

    return EncodeBatch(tokenizer_dir, json.loads(spec_json))


def encode_and_bucket(
    batch: pa.Table, *, tokenizer_dir: str, spec_json: str, batch_size: int, ifd: bool = False
) -> Iterator[pa.Table]:
    """CPU stage before the model (Ray tasks): THE encoder (:class:`EncodeBatch`, built once per worker
    process and cached) over a window of ``sort_window`` rows, the response labels (same text, labels on
    the assistant tokens) and, with ``ifd``, the answer-only encoding, then :func:`_bucket_by_length`.
    Tasks rather than an actor pool: they spread over every free CPU, overlap with the model replicas, and
    their worker processes (tokenizer already loaded) are reused by the next run instead of starting a
    new actor."""
    from selectmoe.data.ray_io import _messages_column

    encoded = _cached_encoder(tokenizer_dir, spec_json)(batch)
    if not isinstance(encoded, pa.Table):  # a dict of columns
        encoded = pa.table(encoded)
    conversations = _messages_column(batch)
    resp = _cached_encoder(tokenizer_dir, json.dumps(response_spec(json.loads(spec_json)), sort_keys=True))
    by_response = resp.encoder.encode_many(conversations)
    encoded = encoded.append_column(
        "response_labels", pa.array([e.labels for e in by_response], pa.list_(pa.int32()))
    )
    if ifd:
        answers = resp.encoder.encode_many([assistant_only(c) for c in conversations])
        encoded = encoded.append_column(
            "answer_input_ids", pa.array([e.input_ids for e in answers], pa.list_(pa.int32()))
        ).append_column("answer_labels", pa.array([e.labels for e in answers], pa.list_(pa.int32())))
    yield from _bucket_by_length(encoded, batch_size=batch_size)


def tokenizer_dir(model_dir: str | os.PathLike) -> str:
    """Where ``load_selector`` takes the tokenizer from: the artefact when it holds one, else its base."""
    root = Path(model_dir)
    if any((root / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return str(root)
    meta = root / "selector.json"
    if meta.is_file():
        base = Path(json.loads(meta.read_text())["base_model_dir"])
        return str(base if base.is_absolute() else (root / base).resolve())
    return str(root)


def read_encoding_spec(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The EncodingSpec dict the selector was trained with (``selector.json``; defaults for a plain model).

    Read from the artefact's JSON so the driver need not load the model (``load_selector`` returns the
    same dict on the replicas)."""
    meta = Path(model_dir) / "selector.json"
    if meta.is_file():
        enc = json.loads(meta.read_text()).get("encoding")
        if enc:
            return dict(enc)
    from selectmoe.data.encoding import EncodingSpec

    return EncodingSpec().to_dict()


def _resources(cfg: ScoreConfig, use_gpu: bool) -> tuple[dict[str, Any], dict[str, Any], int | None]:
    """(scorer remote args, encoder-task remote args, scorer torch threads)."""
    from selectmoe.ray_utils import cluster_cpus

    cpus = cluster_cpus()
    concurrency = max(1, cfg.num_replicas)
    encode_args = {"num_cpus": 0.5}
    if use_gpu:
        return {"num_gpus": float(cfg.num_gpus_per_replica), "num_cpus": 1}, encode_args, None
    # CPU replicas: leave a CPU for the read/encode tasks or the pipeline starves. The replicas' num_cpus
    # must differ from the encode tasks' (0.5): Ray Data fuses a task map into the next actor map when
    # their remote args are equal, which would put tokenisation back on the model actors.
    per_replica = max(0.25, min(1.0, (cpus - 1) / concurrency))
    if per_replica == encode_args["num_cpus"]:
        per_replica = 0.45
    threads = max(1, int((cpus - 1) // concurrency)) if cpus > 2 else 1
    return {"num_cpus": per_replica}, encode_args, threads


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

    parts = [
        read_ingested(cfg.ingest_dir, shards=[str(p)]).map_batches(
            functools.partial(_add_shard_column, name=_shard_name(p)), batch_format="pyarrow"
        )
        for p in shards
    ]
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    scorer_args, encode_args, threads = _resources(cfg, use_gpu)
    ds = ds.map_batches(
        functools.partial(
            encode_and_bucket,
            tokenizer_dir=tokenizer_dir(cfg.model_dir),
            spec_json=json.dumps(dict(encoding), sort_keys=True),
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
        compute=ActorPoolStrategy(size=max(1, cfg.num_replicas)),
        **scorer_args,
    )


# ----------------------------------------------------------------------------------- completion records


def _shard_name(path: Path) -> str:
    return Path(path).name.removesuffix(".parquet")


def _done_path(out_dir: Path, name: str) -> Path:
    return out_dir / SHARD_DIR / f"{name}{DONE_SUFFIX}"


def _out_path(out_dir: Path, name: str) -> Path:
    return out_dir / SHARD_DIR / f"{name}.parquet"


def _input_record(path: Path) -> dict[str, Any]:
    fp = fingerprint(path)
    return {"sha256": fp["sha256"], "size": fp["size"], "rows": pq.ParquetFile(path).metadata.num_rows}


def shard_is_done(out_dir: Path, name: str, inp: Mapping[str, Any], model_fp: str) -> bool:
    out, done = _out_path(out_dir, name), _done_path(out_dir, name)
    if not (out.is_file() and done.is_file()):
        return False
    try:
        rec = json.loads(done.read_text())
    except json.JSONDecodeError:
        return False
    return (
        rec.get("format") == SCORE_FORMAT_VERSION
        and rec.get("input") == dict(inp)
        and rec.get("model_fingerprint") == model_fp
        and rec.get("rows") == inp["rows"]
        and rec.get("output_sha256") == fingerprint(out)["sha256"]
        and pq.ParquetFile(out).metadata.num_rows == inp["rows"]
    )


def _finish_shard(out_dir: Path, name: str, ingest_shard: Path, inp: Mapping[str, Any], model_fp: str) -> int:
    """Verify a closed output shard against its ingest shard, then write its completion record."""
    out = _out_path(out_dir, name)
    got = pq.read_table(out, columns=["id"]).column("id").to_pylist()
    want = pq.read_table(ingest_shard, columns=["id"]).column("id").to_pylist()
    if len(got) != len(want) or len(set(got)) != len(got) or set(got) != set(want):
        missing, extra = set(want) - set(got), set(got) - set(want)
        out.unlink(missing_ok=True)
        raise RuntimeError(
            f"score shard {name}: {len(got)} rows ({len(set(got))} distinct) vs {len(want)} ingested; "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}"
        )
    record = {
        "format": SCORE_FORMAT_VERSION,
        "shard": name,
        "rows": len(got),
        "input": dict(inp),
        "model_fingerprint": model_fp,
        "output_sha256": fingerprint(out)["sha256"],
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    done = _done_path(out_dir, name)
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    tmp.replace(done)
    return len(got)


def _remove_orphans(out_dir: Path, names: set[str]) -> None:
    shard_dir = out_dir / SHARD_DIR
    if not shard_dir.is_dir():
        return
    for p in shard_dir.iterdir():
        stem = p.name
        for suffix in (".parquet.tmp", ".parquet", DONE_SUFFIX, ".done.tmp"):
            if stem.endswith(suffix):
                stem = stem.removesuffix(suffix)
                break
        else:
            continue
        if stem not in names or p.name.endswith((".tmp",)):
            logger.warning("score: removing stale %s", p)
            p.unlink(missing_ok=True)


def model_fingerprint(
    model_dir: str, encoding: Mapping[str, Any], dtype: str, use_gpu: bool, *, ifd: bool = False
) -> str:
    """Model weights/config/tokenizer + the settings that change the numbers (encoding, dtype, IFD pass)."""
    fp = fingerprint(model_dir)
    payload = {
        "model": fp["sha256"],
        "encoding": dict(encoding),
        "dtype": str(resolve_dtype(dtype, use_gpu)),
        "format": SCORE_FORMAT_VERSION,
        "ifd": bool(ifd),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# -------------------------------------------------------------------------------------------------- stage


def run_score(
    cfg: ScoreConfig, *, scorer_cls: type = RouterScorer, scorer_kwargs: Mapping[str, Any] | None = None
) -> ScoreResult:
    """Score every pending shard of the ingest stage's output; see the module docstring.

    ``scorer_cls``/``scorer_kwargs``: the replica class (a :class:`RouterScorer` subclass; benchmarks use a
    random-weight model of a given shape)."""
    from selectmoe.data.ingest import ingested_shards
    from selectmoe.ray_utils import init_ray, resolve_use_gpu

    t0 = time.perf_counter()
    ingest_shards = ingested_shards(cfg.ingest_dir, "score.ingest_dir")
    out_dir = Path(cfg.output_dir)
    (out_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    names = {_shard_name(p): p for p in ingest_shards}
    if len(names) != len(ingest_shards):
        raise RuntimeError(f"ingest shard names are not unique under {cfg.ingest_dir}")
    _remove_orphans(out_dir, set(names))

    init_ray()
    use_gpu = resolve_use_gpu(cfg.use_gpu)
    encoding = read_encoding_spec(cfg.model_dir)
    model_fp = model_fingerprint(str(cfg.model_dir), encoding, cfg.dtype, use_gpu, ifd=bool(cfg.ifd))
    inputs = {name: _input_record(p) for name, p in names.items()}
    skipped = [n for n in names if shard_is_done(out_dir, n, inputs[n], model_fp)]
    pending = [n for n in names if n not in set(skipped)]
    logger.info("score: %d shards pending, %d already scored", len(pending), len(skipped))

    scored, rows_scored, tokens = [], 0, 0
    t_pipe = time.perf_counter()
    # Empty ingest shards never reach the pipeline: write their (empty) output directly.
    for name in [n for n in pending if inputs[n]["rows"] == 0]:
        shape = _shape_from_model_dir(str(cfg.model_dir))
        RouterDataWriter(out_dir, name, *shape).close()
        _finish_shard(out_dir, name, names[name], inputs[name], model_fp)
        scored.append(name)
    work = [n for n in pending if inputs[n]["rows"] > 0]
    if work:
        stop_after = int(os.environ.get(STOP_AFTER_ENV, "0") or 0)
        ds = build_score_dataset(
            cfg,
            [names[n] for n in work],
            use_gpu=use_gpu,
            encoding=encoding,
            crash_once_marker=os.environ.get(CRASH_ONCE_ENV) or None,
            scorer_cls=scorer_cls,
            scorer_kwargs=scorer_kwargs,
        )
        logger.info("score: pipeline built, %d shards to score", len(work))
        for name, n_rows, n_tok in _consume(ds, out_dir, names, inputs, model_fp, stop_after=stop_after):
            logger.info("score: shard %s done (%d rows) at %.1fs", name, n_rows, time.perf_counter() - t0)
            scored.append(name)
            rows_scored += n_rows
            tokens += n_tok
    pipe_s = time.perf_counter() - t_pipe

    total_rows = sum(inputs[n]["rows"] for n in names)
    result = ScoreResult(
        output_dir=str(out_dir),
        rows=total_rows,
        rows_scored=rows_scored,
        tokens_scored=tokens,
        rejected=int(((read_manifest(cfg.ingest_dir) or {}).get("counts") or {}).get("n_rejected", 0)),
        rejected_path=str(Path(cfg.ingest_dir) / "rejected.jsonl"),
        shards_scored=sorted(scored),
        shards_skipped=sorted(skipped),
        model_fingerprint=model_fp,
        tokens_per_s=tokens / pipe_s if tokens and pipe_s > 0 else 0.0,
        wall_s=time.perf_counter() - t0,
    )
    ingest_manifest = Path(cfg.ingest_dir) / "_manifest.json"
    write_manifest(
        out_dir,
        stage="score",
        config=cfg,
        inputs={
            "model_dir": {"sha256": model_fp},
            **({"ingest": ingest_manifest} if ingest_manifest.is_file() else {}),
        },
        counts={
            "rows": total_rows,
            "rows_scored": rows_scored,
            "tokens_scored": tokens,
            "rejected": result.rejected,
            "shards": len(names),
            "shards_scored": len(scored),
            "shards_skipped": len(skipped),
            "tokens_per_s": round(result.tokens_per_s, 2),
        },
        wall_s=result.wall_s,
        extra={"model_fingerprint": model_fp, "encoding": encoding, "use_gpu": use_gpu},
    )
    return result


def _shape_from_model_dir(model_dir: str) -> tuple[int, int]:
    from transformers import AutoConfig

    import selectmoe  # noqa: F401  (registers the Select-MoE Auto classes)

    path = Path(model_dir)
    meta = path / "selector.json"
    if meta.is_file() and not (path / "config.json").is_file():
        path = Path(json.loads(meta.read_text())["base_model_dir"])
    return _model_shape(AutoConfig.from_pretrained(path))


def _consume(
    ds,
    out_dir: Path,
    names: Mapping[str, Path],
    inputs: Mapping[str, Mapping[str, Any]],
    model_fp: str,
    *,
    stop_after: int = 0,
) -> Iterator[tuple[str, int, int]]:
    """Drive the dataset: route rows to per-shard writers, drop rows a retried task delivered twice, close
    and verify each shard as its last row arrives. Yields ``(shard, rows, tokens)`` per finished shard."""
    writers: dict[str, RouterDataWriter] = {}
    seen: dict[str, set[str]] = {}
    tokens: dict[str, int] = {}
    done: set[str] = set()
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            shard_col = batch.column(SHARD_COLUMN)
            shard_names = pc.unique(shard_col).to_pylist()
            for name in shard_names:
                if name in done:  # a retried task re-delivered rows of a shard already closed
                    logger.warning("score: dropped re-delivered rows of finished shard %s", name)
                    continue
                sub = batch if len(shard_names) == 1 else batch.filter(pc.equal(shard_col, name))
                ids = sub.column("id").to_pylist()
                ids_seen = seen.setdefault(name, set())
                fresh = [i for i, x in enumerate(ids) if x not in ids_seen]
                if len(fresh) != len(ids):
                    logger.warning("score: dropped %d re-delivered rows of %s", len(ids) - len(fresh), name)
                    sub = sub.take(pa.array(fresh, pa.int64()))
                if sub.num_rows == 0:
                    continue
                ids_seen.update(sub.column("id").to_pylist())
                writer = writers.get(name)
                if writer is None:
                    num_layers = sub.schema.field("quality_layers").type.list_size
                    num_experts = sub.schema.field("routing").type.list_size // num_layers
                    writer = writers[name] = RouterDataWriter(out_dir, name, num_layers, num_experts)
                writer.write_batch(_columns(sub, writer.num_layers, writer.num_layers * writer.num_experts))
                tokens[name] = tokens.get(name, 0) + int(pc.sum(sub.column("n_tokens")).as_py() or 0)
                if writer.rows >= inputs[name]["rows"]:
                    writers.pop(name).close()
                    seen.pop(name)
                    n = _finish_shard(out_dir, name, names[name], inputs[name], model_fp)
                    done.add(name)
                    yield name, n, tokens.pop(name)
                    if stop_after and len(done) >= stop_after:
                        raise ScoreInterrupted(f"test hook {STOP_AFTER_ENV}={stop_after}: stopping")
        if writers:
            raise RuntimeError(
                "score pipeline ended with incomplete shards: "
                + ", ".join(f"{n} ({w.rows}/{inputs[n]['rows']} rows)" for n, w in writers.items())
            )
    finally:
        for writer in writers.values():
            writer.abort()


def _columns(table: pa.Table, num_layers: int, width: int) -> dict[str, Any]:
    n = table.num_rows

    def fixed(col: str, k: int) -> np.ndarray:
        arr = table.column(col).combine_chunks()
        return arr.flatten().to_numpy(zero_copy_only=False).reshape(n, k)

    return {
        "id": table.column("id").to_pylist(),
        "dataset": table.column("dataset").to_pylist(),
        "n_tokens": table.column("n_tokens").to_numpy(),
        "truncated": table.column("truncated").to_numpy(zero_copy_only=False),
        **{c: table.column(c).to_numpy() for c in ("quality", "response_nll", "sample_nll", "ifd")},
        "quality_layers": fixed("quality_layers", num_layers),
        "routing": fixed("routing", width),
    }
