"""Score stage: router inference over the whole ingested pool on Ray Data -> router-data Parquet shards.

One Ray Data execution over every *pending* ingest shard (:mod:`selectmoe.scoring.dataset`): the shards
are read with a shard column, encoded and length-bucketed by CPU tasks, scored by an actor pool of model
replicas (:class:`selectmoe.scoring.scorer.RouterScorer`, THE scoring function
:func:`selectmoe.scoring.model.score_batch`), and written by the driver, one writer per shard
(:mod:`selectmoe.scoring.writer`), which verifies each shard before its completion record
(:mod:`selectmoe.scoring.records`).

Why one pipeline with a shard column: the model replicas are loaded once for the whole pool (a pipeline
per shard would restart the actor pool, i.e. reload a 7B model, for every shard).

Per sample, from ONE forward pass: the gate score + routing features (a Select-MoE; routing only for
another HF MoE; neither for a dense causal LM, :mod:`selectmoe.scoring.loading`), the pooled hidden state
(``score.hidden``, forced on without routing) and the base perplexity anchors (``response_nll`` over the
assistant tokens, ``sample_nll`` over all); ``score.ifd=true`` adds a second, shorter pass of the answer
alone for IFD. The encode tasks add the answer's text signals (:mod:`selectmoe.scoring.text_signals`). Memory: the NLL needs the full ``[batch_size, T, vocab]`` logits
(model dtype; each row is reduced in fp32), e.g. 32 x 1024 x 50k bf16 = 3.3 GB on OLMoE: lower
``score.batch_size`` if a replica runs out of memory.

Input: the shards in ``ingest_dir`` (the ingest stage writes them; this stage never ingests) and the
selector in ``model_dir``. Idempotence / resume: a shard counts as done only when its output and
completion record match (input fingerprint, model fingerprint + scoring settings, rows, checksum); a rerun
skips those and (re)scores everything else from scratch (the writer is atomic). Output shards whose ingest
shard no longer exists are removed. A scorer actor that dies is restarted and its task retried by Ray; a
killed driver is a rerun. Test hooks: ``SELECTMOE_SCORE_CRASH_ONCE`` (:mod:`selectmoe.scoring.scorer`),
``SELECTMOE_SCORE_STOP_AFTER_SHARDS`` (:mod:`selectmoe.scoring.writer`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from selectmoe import storage
from selectmoe.config import ScoreConfig
from selectmoe.data.truncation import TRUNCATION_COLUMNS, truncation_summary
from selectmoe.manifest import read_manifest, write_manifest
from selectmoe.router_data import SHARD_DIR, TEXT_COLUMNS, RouterDataWriter
from selectmoe.scoring.dataset import build_score_dataset, read_encoding_spec
from selectmoe.scoring.features import stored_hidden_dim
from selectmoe.scoring.loading import scorer_info
from selectmoe.scoring.records import (
    finish_shard,
    input_record,
    model_fingerprint,
    out_path,
    remove_orphans,
    shard_is_done,
    shard_name,
)
from selectmoe.scoring.scorer import CRASH_ONCE_ENV, RouterScorer
from selectmoe.scoring.writer import STOP_AFTER_ENV, ScoreInterrupted, consume_shards
from selectmoe.stages.contract import check_inputs

logger = logging.getLogger(__name__)


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
    scorer: dict[str, Any] = field(default_factory=dict)  # which model, which signals (scoring/loading.py)
    tokens_per_s: float = 0.0
    wall_s: float = 0.0
    truncation: dict[str, Any] = field(default_factory=dict)  # per dataset (data.truncation)

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out["shards_scored"] = len(self.shards_scored)
        out["shards_skipped"] = len(self.shards_skipped)
        return out


def run_score(
    cfg: ScoreConfig, *, scorer_cls: type = RouterScorer, scorer_kwargs: Mapping[str, Any] | None = None
) -> ScoreResult:
    """Score every pending shard of the ingested pool (``cfg.ingest_dir``); see the module docstring.

    ``scorer_cls``/``scorer_kwargs``: the replica class (a :class:`RouterScorer` subclass; benchmarks use a
    random-weight model of a given shape)."""
    from selectmoe.data.ingest import list_shards
    from selectmoe.ray_utils import init_ray, resolve_use_gpu

    check_inputs("score", cfg)
    t0 = time.perf_counter()
    ingest_counts = (read_manifest(cfg.ingest_dir) or {}).get("counts") or {}
    ingest_shards = list_shards(cfg.ingest_dir)  # Paths, or URIs on shared storage
    out_dir = Path(cfg.output_dir)
    (out_dir / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    names = {shard_name(p): p for p in ingest_shards}
    if len(names) != len(ingest_shards):
        raise RuntimeError(f"ingest shard names are not unique under {cfg.ingest_dir}")
    remove_orphans(out_dir, set(names))

    init_ray()
    use_gpu = resolve_use_gpu(cfg.use_gpu)
    encoding = read_encoding_spec(cfg.model_dir)
    info = scorer_info(cfg.model_dir)
    # a scorer without routing (a dense model) clusters on hidden states: store them whatever score.hidden
    want_hidden = bool(cfg.hidden) or info["num_experts"] == 0
    hidden_dim = stored_hidden_dim(info["hidden_size"], cfg.hidden_dim) if want_hidden else 0
    if want_hidden and int(cfg.hidden_dim) < 1:
        raise ValueError(f"score.hidden_dim must be >= 1, got {cfg.hidden_dim}")
    info["signals"] = [
        *info["signals"],
        *(["ifd"] if cfg.ifd else []),
        *TEXT_COLUMNS,
        *(["routing"] if info["num_experts"] else []),
        *(["hidden"] if hidden_dim else []),
    ]
    info["hidden_dim"] = hidden_dim
    if not cfg.hidden and hidden_dim:
        logger.info(
            "score: %s has no routing; storing hidden-state features (dim %d)", cfg.model_dir, hidden_dim
        )

    def make_writer(name: str) -> RouterDataWriter:
        return RouterDataWriter(
            out_dir,
            name,
            info["num_layers"],
            info["num_experts"],
            gate=info["kind"] == "select_moe",
            hidden_dim=hidden_dim,
        )

    model_fp = model_fingerprint(
        str(cfg.model_dir), encoding, cfg.dtype, use_gpu, ifd=bool(cfg.ifd), hidden_dim=hidden_dim
    )
    inputs = {name: input_record(p) for name, p in names.items()}
    skipped = [n for n in names if shard_is_done(out_dir, n, inputs[n], model_fp)]
    pending = [n for n in names if n not in set(skipped)]
    logger.info("score: %d shards pending, %d already scored", len(pending), len(skipped))

    scored, rows_scored, tokens = [], 0, 0
    t_pipe = time.perf_counter()
    # Empty ingest shards never reach the pipeline: write their (empty) output directly.
    for name in [n for n in pending if inputs[n]["rows"] == 0]:
        make_writer(name).close()
        finish_shard(out_dir, name, names[name], inputs[name], model_fp)
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
            scorer_kwargs={"hidden_dim": hidden_dim, **dict(scorer_kwargs or {})},
        )
        logger.info("score: pipeline built, %d shards to score", len(work))
        for name, n_rows, n_tok in consume_shards(
            ds, out_dir, names, inputs, model_fp, make_writer=make_writer, stop_after=stop_after
        ):
            logger.info("score: shard %s done (%d rows) at %.1fs", name, n_rows, time.perf_counter() - t0)
            scored.append(name)
            rows_scored += n_rows
            tokens += n_tok
    pipe_s = time.perf_counter() - t_pipe

    total_rows = sum(inputs[n]["rows"] for n in names)
    flags = [pq.read_table(out_path(out_dir, n), columns=list(TRUNCATION_COLUMNS)) for n in sorted(names)]
    truncation = truncation_summary(
        "score", flags, int(encoding["max_length"]), effect="their scores describe a prefix"
    )
    result = ScoreResult(
        output_dir=str(out_dir),
        rows=total_rows,
        rows_scored=rows_scored,
        tokens_scored=tokens,
        rejected=int(ingest_counts.get("n_rejected", 0)),
        rejected_path=storage.join(cfg.ingest_dir, "rejected.jsonl"),
        shards_scored=sorted(scored),
        shards_skipped=sorted(skipped),
        model_fingerprint=model_fp,
        scorer=info,
        tokens_per_s=tokens / pipe_s if tokens and pipe_s > 0 else 0.0,
        wall_s=time.perf_counter() - t0,
        truncation=truncation,
    )
    ingest_manifest = storage.join(cfg.ingest_dir, "_manifest.json")
    write_manifest(
        out_dir,
        stage="score",
        config=cfg,
        inputs={
            "model_dir": {"sha256": model_fp},
            **({"ingest": ingest_manifest} if storage.is_file(ingest_manifest) else {}),
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
            "truncated": sum(d["truncated"] for d in truncation["datasets"].values()),
        },
        wall_s=result.wall_s,
        extra={
            "model_fingerprint": model_fp,
            "scorer": info,
            "encoding": encoding,
            "use_gpu": use_gpu,
            "truncation": truncation,
        },
    )
    return result


__all__ = ["CRASH_ONCE_ENV", "STOP_AFTER_ENV", "ScoreInterrupted", "ScoreResult", "run_score"]
