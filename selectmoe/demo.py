"""Demo assets: everything ``selectmoe demo`` needs, built locally with no download.

1. a generated, license-clean instruction pool with known-bad twins (labels in a side file the pipeline
   never reads; only the report does) and a few malformed rows to show quarantine;
2. a byte-level BPE tokenizer trained on that pool;
3. a tiny OLMoE (4 layers, 16 experts, top-4, d=128) pre-trained briefly on a *separate* clean sample of
   the same skills, so that its quality gates later have a real signal to learn (a random-init base
   finds clean and corrupted text equally unpredictable);
4. a tiny dense target (Llama-shaped) for the finetune stage, pre-trained briefly on the same held-out
   clean text (fewer steps: it must know the format but leave the skills to learn, so that a finetune on
   clean demo data raises its eval accuracy and one on bad data lowers it; a random-init target's
   accuracy measured answer-length artefacts only), and the demo lm-eval task.

The pre-training loop is deliberately minimal (constant lr, no clipping): it only makes demo weights.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from selectmoe.config import DemoConfig

logger = logging.getLogger(__name__)
DEMO_DEV_PER_SKILL = 5  # the demo task's few-shot split (targeted selection's targets), as MMLU's 5-shot dev


@dataclass
class DemoAssets:
    pool_dir: str
    labels_path: str
    tokenizer_dir: str
    olmoe_dir: str
    target_dir: str
    tasks_dir: str
    n_pool_rows: int
    pretrain_loss_first: float
    pretrain_loss_last: float
    target_loss_first: float
    target_loss_last: float
    wall_s: float

    def summary(self) -> dict:
        return {
            "n_pool_rows": self.n_pool_rows,
            "pretrain_loss_first": round(self.pretrain_loss_first, 3),
            "pretrain_loss_last": round(self.pretrain_loss_last, 3),
            "target_loss_first": round(self.target_loss_first, 3),
            "target_loss_last": round(self.target_loss_last, 3),
            "wall_s": round(self.wall_s, 1),
        }


def prepare_demo_assets(cfg: DemoConfig, *, seed: int = 42) -> DemoAssets:
    from selectmoe.data.demo_pool import build_demo_pool
    from selectmoe.data.readers import expand_inputs, iter_rows
    from selectmoe.model.tiny import build_tiny_olmoe, train_bpe_tokenizer

    t0 = time.perf_counter()
    root = Path(cfg.dir)
    root.mkdir(parents=True, exist_ok=True)
    pool = build_demo_pool(root / "pool", n_clean=cfg.n_clean, bad_fraction=cfg.bad_fraction, seed=seed)
    pretrain = build_demo_pool(
        root / "pretrain_corpus", n_clean=cfg.n_clean, bad_fraction=0.0, seed=seed + 1, parquet_fraction=0.0
    )
    pretrain_records = _read_records(pretrain.paths)
    texts = [m["content"] for r in pretrain_records for m in r["messages"]]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=cfg.vocab_size)
    tokenizer.save_pretrained(root / "tokenizer")

    torch.manual_seed(seed)
    olmoe = build_tiny_olmoe(tokenizer, seed=seed)
    first, last = _pretrain(olmoe, tokenizer, pretrain_records, cfg, steps=cfg.pretrain_steps, seed=seed)
    olmoe.save_pretrained(root / "tiny_olmoe")
    tokenizer.save_pretrained(root / "tiny_olmoe")

    target_first, target_last = build_demo_target(cfg, tokenizer, pretrain_records, seed=seed)
    n_rows = sum(1 for source in expand_inputs([str(p) for p in pool.all_paths]) for _ in iter_rows(source))
    return DemoAssets(
        pool_dir=str(root / "pool"),
        labels_path=str(pool.labels_path),
        tokenizer_dir=str(root / "tokenizer"),
        olmoe_dir=str(root / "tiny_olmoe"),
        target_dir=str(root / "tiny_target"),
        tasks_dir=str(root / "tasks"),
        n_pool_rows=n_rows,
        pretrain_loss_first=first,
        pretrain_loss_last=last,
        target_loss_first=target_first,
        target_loss_last=target_last,
        wall_s=time.perf_counter() - t0,
    )


def build_demo_target(
    cfg: DemoConfig, tokenizer, pretrain_records: list[dict], *, seed: int
) -> tuple[float, float]:
    """The finetune target (pre-trained ``cfg.target_pretrain_steps`` on the clean corpus) and the eval
    task of ``cfg.n_eval`` held-out questions, under ``cfg.dir``; returns the target's pre-training losses.

    Separate from the pool and the selector's base, which it does not touch: an experiment on the target or
    the eval reruns only this (:func:`rebuild_demo_target`)."""
    from selectmoe.data.demo_pool import build_demo_dev, build_demo_eval
    from selectmoe.eval_tasks import write_demo_task
    from selectmoe.model.tiny import build_tiny_dense_target

    root = Path(cfg.dir)
    target = build_tiny_dense_target(tokenizer, arch="llama", seed=seed)
    losses = _pretrain(
        target, tokenizer, pretrain_records, cfg, steps=cfg.target_pretrain_steps, seed=seed + 3
    )
    target.save_pretrained(root / "tiny_target")
    tokenizer.save_pretrained(root / "tiny_target")
    eval_path = build_demo_eval(root / "eval", n=cfg.n_eval, seed=seed + 2)
    build_demo_dev(root / "eval", per_skill=DEMO_DEV_PER_SKILL, seed=seed + 4)  # few-shot split: targets
    write_demo_task(root / "tasks", eval_path)
    return losses


def rebuild_demo_target(cfg: DemoConfig, *, seed: int = 42) -> tuple[float, float]:
    """:func:`build_demo_target` on assets :func:`prepare_demo_assets` already wrote to ``cfg.dir``."""
    from transformers import AutoTokenizer

    root = Path(cfg.dir)
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    records = _read_records(sorted((root / "pretrain_corpus").glob("pool-*.jsonl")))
    return build_demo_target(cfg, tokenizer, records, seed=seed)


def _read_records(paths) -> list[dict]:
    records = []
    for p in paths:
        for line in Path(p).read_text().splitlines():
            if not line.strip():
                continue
            obj = json.loads(line)
            if "messages" in obj:
                records.append(obj)
    return records


def _pretrain(
    model, tokenizer, records: list[dict], cfg: DemoConfig, *, steps: int, seed: int
) -> tuple[float, float]:
    """Causal-LM pre-training of a tiny model on clean demo text (full-sequence labels); returns the first
    and the mean of the last 10 losses (``nan`` for 0 steps: the model stays as initialised)."""
    if steps <= 0:
        return float("nan"), float("nan")
    from selectmoe.data.encoding import ChatEncoder, EncodingSpec, pad_batch
    from selectmoe.training.determinism import deterministic_cpu, torch_threads

    encoder = ChatEncoder(tokenizer, EncodingSpec(max_length=256, label_mode="full_sequence"))
    encoded = [encoder.encode(r["messages"]) for r in records]
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr)
    model.train()
    losses = []
    # the same base on every build and launch mode (else the selection drifts): deterministic kernels and
    # a fixed thread count (CPU results depend on it; a `ray job submit` driver inherits 1 thread)
    with deterministic_cpu(), torch_threads(cfg.pretrain_threads):
        for _ in range(steps):
            batch = pad_batch(rng.sample(encoded, cfg.pretrain_batch_size), tokenizer.pad_token_id)
            loss = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
            ).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    model.eval()
    logger.info("demo pre-training (%d steps): loss %.3f -> %.3f", steps, losses[0], losses[-1])
    return losses[0], sum(losses[-10:]) / len(losses[-10:])


def read_demo_labels(path: str | Path) -> dict[str, str]:
    """``id -> clean | <corruption>``: used by the report only."""
    labels = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            obj = json.loads(line)
            labels[obj["id"]] = obj["label"]
    return labels
