"""Score-stage throughput: the Ray Data pipeline vs a bare single-process loop over the same model and batches.

    python benchmarks/score.py                 # CPU: tiny Select-MoE, ratio Ray Data / bare loop
    python benchmarks/score.py --olmoe-shape   # 1 GPU: random-weight OLMoE-1B-7B shape, bf16 (skips w/o CUDA)

Both sides score the *same tokenised, length-bucketed batches*: they are taken from the pipeline itself
(read -> EncodeBatch -> bucketing, materialised once) and fed to the same :class:`RouterScorer` in-process
for the bare loop. The Ray figure is end to end for the scoring pipeline (read, tokenise, bucket, model
actors incl. their model load, driver-side Parquet writes, verification), the bare figure is the model
loop alone (model already loaded), so the ratio is the whole cost of running on Ray Data. The goal on one
device is overhead <= 5%. On a 2-core CPU box tokenisation and the model compete for the same cores, so
the CPU ratio is a pessimistic bound; the GPU mode is the meaningful one (the CPU work overlaps the GPU).

``--olmoe-shape`` also runs a *plain HF loop* (pool order, no length bucketing, full ``[B, T, V]``
logits) as the design's anchor for the >= 2x target, and reports MFU at ~2.6 GFLOP/token (2 x 1.3B
active parameters) against the H100/H200 dense bf16 peak (989 TFLOP/s), plus peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selectmoe.config import ScoreConfig
from selectmoe.scoring.dataset import build_score_dataset, read_encoding_spec, replica_resources
from selectmoe.scoring.scorer import RouterScorer
from selectmoe.stages.score import run_score

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "with",
    "was",
    "on",
    "be",
    "by",
    "this",
    "are",
    "or",
    "from",
    "at",
    "an",
    "which",
    "have",
    "not",
    "but",
    "model",
    "data",
    "router",
    "expert",
    "token",
    "gate",
    "quality",
    "score",
    "sample",
    "answer",
    "question",
    "why",
    "how",
    "when",
    "where",
    "what",
]
OLMOE_FLOP_PER_TOKEN = 2.6e9
PEAK_BF16 = 989e12  # H100 / H200 SXM dense bf16


def make_pool(directory: Path, n: int, files: int, max_words: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    per = -(-n // files)
    for f in range(files):
        path = directory / f"part{f:03d}.jsonl"
        with path.open("w") as fh:
            for i in range(f * per, min(n, (f + 1) * per)):
                n_user = int(rng.integers(4, max(5, max_words // 4)))
                n_asst = int(rng.integers(4, max_words))
                rec = {
                    "dataset": f"ds{i % 3}",
                    "id": f"s{i}",
                    "messages": [
                        {"role": "user", "content": " ".join(rng.choice(WORDS, n_user))},
                        {"role": "assistant", "content": " ".join(rng.choice(WORDS, n_asst))},
                    ],
                }
                fh.write(json.dumps(rec) + "\n")
        paths.append(str(path))
    return paths


def start_ray(num_cpus: int | None) -> None:
    """A private local Ray (never a head another process started), then the stage's own init_ray reuses it."""
    import ray

    from selectmoe.ray_utils import WORKER_ENV

    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": dict(WORKER_ENV)},
    )


def bare_loop(scorer, batches) -> tuple[float, int]:
    scorer(batches[0])  # warm-up (allocator, kernels)
    _sync()
    tokens = 0
    t = time.perf_counter()
    for b in batches:
        scorer(b)
        tokens += int(np.asarray(b.column("n_tokens")).sum())
    _sync()
    return time.perf_counter() - t, tokens


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def score_config(model_dir: Path, pool: list[str], work: Path, args, *, use_gpu: bool) -> ScoreConfig:
    """The one score config both modes benchmark (one replica, fp32 on CPU, bf16 on GPU), over ``pool``
    ingested into ``work/ingest``."""
    from selectmoe.data.ingest import ensure_ingested

    ensure_ingested(pool, work / "ingest")
    return ScoreConfig(
        model_dir=str(model_dir),
        ingest_dir=str(work / "ingest"),
        output_dir=str(work / "router"),
        batch_size=args.batch_size,
        num_replicas=1,
        num_gpus_per_replica=1.0,
        use_gpu=use_gpu,
        dtype="bfloat16" if use_gpu else "float32",
        sort_window=args.sort_window,
    )


def tokenised_batches(cfg: ScoreConfig, use_gpu: bool):
    from selectmoe.data.ingest import list_shards

    ds = build_score_dataset(
        cfg,
        [Path(p) for p in list_shards(cfg.ingest_dir)],
        use_gpu=use_gpu,
        encoding=read_encoding_spec(cfg.model_dir),
        with_scorer=False,
    )
    # the scorer's own slicing: batch_size rows in stream order
    return [b for b in ds.iter_batches(batch_size=cfg.batch_size, batch_format="pyarrow") if b.num_rows]


def ray_pipeline(cfg: ScoreConfig, repeats: int, **score_kw) -> dict:
    """End to end (``run_score``: actor start + model load, read, tokenise, score, write, verify) and steady
    state (the same Ray Data pipeline, tokens/s between the first and the last scored batch, i.e. without
    the fixed start-up cost that a large pool amortises)."""
    from selectmoe.data.ingest import list_shards

    e2e, steady = [], []
    tokens = 0
    for r in range(repeats):
        out = Path(cfg.output_dir + f"_{r}")
        shutil.rmtree(out, ignore_errors=True)
        res = run_score(ScoreConfig(**{**cfg.__dict__, "output_dir": str(out)}), **score_kw)
        e2e.append(res.tokens_per_s)
        tokens = res.tokens_scored
        ds = build_score_dataset(
            cfg,
            [Path(p) for p in list_shards(cfg.ingest_dir)],
            use_gpu=bool(cfg.use_gpu),
            encoding=read_encoding_spec(cfg.model_dir),
            scorer_cls=score_kw.get("scorer_cls", RouterScorer),
            scorer_kwargs=score_kw.get("scorer_kwargs"),
        )
        first, n_after_first, t_first = True, 0, 0.0
        for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            if first:
                first, t_first = False, time.perf_counter()
            else:
                n_after_first += int(np.asarray(b.column("n_tokens")).sum())
        steady.append(n_after_first / max(time.perf_counter() - t_first, 1e-9))
    return {"tokens": tokens, "e2e": max(e2e), "steady": max(steady), "e2e_all": e2e, "steady_all": steady}


def cpu_mode(args) -> dict:
    import torch

    from selectmoe.model.tiny import build_tiny_select_moe, train_bpe_tokenizer

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_score_"))
    pool = make_pool(work / "pool", args.n, args.files, args.max_words)
    texts = [" ".join(np.random.default_rng(i).choice(WORDS, 100)) for i in range(100)]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=400)
    model = build_tiny_select_moe(tokenizer, seed=0)
    model_dir = work / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    del model
    start_ray(args.num_cpus)
    cfg = score_config(model_dir, pool, work, args, use_gpu=False)
    batches = tokenised_batches(cfg, use_gpu=False)
    threads = replica_resources(cfg, False)[2] or 1
    scorer = RouterScorer(str(model_dir), dtype="float32", use_gpu=False, num_threads=threads)
    bare_s, tokens = bare_loop(scorer, batches)
    bare_rate = tokens / bare_s
    del scorer
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    ray = ray_pipeline(cfg, args.repeats)
    assert ray["tokens"] == tokens, (ray["tokens"], tokens)
    return {
        "mode": "cpu-tiny",
        "samples": args.n,
        "tokens": tokens,
        "batches": len(batches),
        "batch_size": args.batch_size,
        "torch_threads_per_replica": threads,
        "bare_tokens_per_s": round(bare_rate, 1),
        **_ray_fields(ray, bare_rate),
        "goal_overhead_pct": 5.0,
    }


def plain_hf_loop(scorer, batches, batch_size: int) -> float:
    """The anchor: rows in pool order (no length bucketing), a full forward with [B, T, V] logits."""
    import pyarrow as pa
    import torch

    from selectmoe.model import router_sample_stats, token_mask_for_scope

    rows = pa.concat_tables(batches).sort_by("id")
    plain = [rows.slice(i, batch_size) for i in range(0, rows.num_rows, batch_size)]

    def step(b):
        ids, mask, labels = scorer.tensors(b)
        with torch.inference_mode():
            out = scorer.model(input_ids=ids, attention_mask=mask, output_router_logits=True)
            router_sample_stats(out.router_logits, token_mask_for_scope(mask, labels, scorer.scope))

    step(plain[0])
    _sync()
    t = time.perf_counter()
    for b in plain:
        step(b)
    _sync()
    return int(np.asarray(rows.column("n_tokens")).sum()) / (time.perf_counter() - t)


def _ray_fields(ray: dict, bare_rate: float) -> dict:
    return {
        "ray_e2e_tokens_per_s": round(ray["e2e"], 1),
        "ray_steady_tokens_per_s": round(ray["steady"], 1),
        "ratio_ray_steady_over_bare": round(ray["steady"] / bare_rate, 3),
        "overhead_steady_pct": round(100 * (1 - ray["steady"] / bare_rate), 1),
        "ratio_ray_e2e_over_bare": round(ray["e2e"] / bare_rate, 3),
    }


class RandomOlmoeScorer(RouterScorer):
    """RouterScorer over a random-weight OLMoE-1B-7B-shaped Select-MoE (speed does not depend on weights)."""

    def __init__(self, model_dir: str, *, config: dict, **kw):
        self._config = config
        super().__init__(model_dir, **kw)

    def _load(self, model_dir: str):
        import torch
        from transformers import AutoTokenizer

        from selectmoe.model import SelectMoeConfig, SelectMoeForCausalLM

        torch.manual_seed(0)
        with torch.device(self.device):
            model = SelectMoeForCausalLM(SelectMoeConfig(**self._config)).to(self.dtype)
        return model, AutoTokenizer.from_pretrained(model_dir)


OLMOE_1B_7B = {
    "vocab_size": 50304,
    "hidden_size": 2048,
    "intermediate_size": 1024,
    "num_hidden_layers": 16,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "max_position_embeddings": 4096,
    "norm_topk_prob": False,
}


def gpu_mode(args) -> dict:
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"mode": "olmoe-shape", "skipped": "no CUDA device"}))
        return {}
    from selectmoe.model.tiny import train_bpe_tokenizer

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_score_gpu_"))
    pool = make_pool(work / "pool", args.n, args.files, args.max_words)
    texts = [" ".join(np.random.default_rng(i).choice(WORDS, 200)) for i in range(200)]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=2000)
    tok_dir = work / "tokenizer"
    tokenizer.save_pretrained(tok_dir)
    start_ray(args.num_cpus)
    cfg = score_config(tok_dir, pool, work, args, use_gpu=True)
    batches = tokenised_batches(cfg, use_gpu=True)
    torch.cuda.reset_peak_memory_stats()
    scorer = RandomOlmoeScorer(str(tok_dir), config=OLMOE_1B_7B, dtype="bfloat16", use_gpu=True)
    weights_gib = torch.cuda.memory_allocated() / 2**30
    bare_s, tokens = bare_loop(scorer, batches)
    bare_rate = tokens / bare_s
    peak_gib = torch.cuda.max_memory_allocated() / 2**30

    # plain HF loop: pool order (no bucketing), full logits, same batch size
    plain_rate = plain_hf_loop(scorer, batches, args.batch_size)
    del scorer
    torch.cuda.empty_cache()

    ray = ray_pipeline(cfg, args.repeats, scorer_cls=RandomOlmoeScorer, scorer_kwargs={"config": OLMOE_1B_7B})
    return {
        "mode": "olmoe-shape-bf16",
        "device": torch.cuda.get_device_name(),
        "samples": args.n,
        "tokens": tokens,
        "batch_size": args.batch_size,
        "bare_tokens_per_s": round(bare_rate, 1),
        "plain_hf_tokens_per_s": round(plain_rate, 1),
        "speedup_vs_plain_hf": round(bare_rate / plain_rate, 2),
        **_ray_fields(ray, bare_rate),
        "mfu_bare": round(bare_rate * OLMOE_FLOP_PER_TOKEN / PEAK_BF16, 4),
        "mfu_ray_steady": round(ray["steady"] * OLMOE_FLOP_PER_TOKEN / PEAK_BF16, 4),
        "weights_gib": round(weights_gib, 2),
        "peak_memory_gib": round(peak_gib, 2),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--olmoe-shape", action="store_true", help="GPU: random-weight OLMoE-1B-7B shape, bf16")
    p.add_argument("--n", type=int, default=None, help="samples (default 600 CPU, 4000 GPU)")
    p.add_argument("--files", type=int, default=4, help="pool files (= ingest shards)")
    p.add_argument("--max-words", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--sort-window", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    if args.olmoe_shape:
        args.n = args.n or 4000
        args.max_words = args.max_words or 900
        args.batch_size = args.batch_size or 32
        result = gpu_mode(args)
    else:
        args.n = args.n or 600
        args.max_words = args.max_words or 120
        args.batch_size = args.batch_size or 16
        result = cpu_mode(args)
    if result:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
