"""Warmup training throughput: the Ray Train loop (1 worker) vs a bare single-process loop and vs HF
``Trainer`` (one process, the anchor for "use the well-kept loop"), same rows and batches.

Both run THE step (``selectmoe.training.loop.forward_backward`` with global counts, clip, AdamW, schedule)
on the same synthetic rows, micro-batched the same way; the ratio ``ray / bare`` of non-pad tokens/s
(steady state: the Ray number is the mean ``tokens_per_s`` of the reports after the first window, the bare
number is timed after ``--warmup-steps``) measures the loop's overhead (goal >= 0.95).

``--olmoe-shape`` (CUDA only; skips cleanly otherwise): a random-weight Select-MoE with the OLMoE-1B-7B
shape (16 layers, d=2048, 64 experts top-8), bf16 frozen weights + fp32 trainable (full_rank), bare loop:
tokens/s and peak GPU memory.

    python benchmarks/warmup.py [--steps 30] [--batch-size 8] [--micro-batch-size 4] [--length 128]
    python benchmarks/warmup.py --olmoe-shape [--length 1024]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _rows(n: int, length: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        L = int(rng.integers(length // 2, length + 1))
        ids = rng.integers(5, vocab, size=L).astype(np.int32)
        rows.append({"input_ids": ids.tolist(), "labels": ids.tolist()})
    return rows


def _make_model_dir(root: Path, hidden: int) -> tuple[str, int, int]:
    from selectmoe.model.tiny import build_tiny_select_moe, train_bpe_tokenizer

    texts = [f"sample {i} with words {' '.join(str(j * i) for j in range(12))}" for i in range(200)]
    tok = train_bpe_tokenizer(texts, vocab_size=512)
    overrides = {} if hidden <= 0 else {"hidden_size": hidden, "intermediate_size": hidden}
    model = build_tiny_select_moe(tok, seed=0, **overrides)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return str(root / "model"), len(tok), tok.pad_token_id


def bare_loop(factory, rows, *, spec, warmup_steps: int) -> dict:
    """Single process, no Ray: same padding, counts, forward/backward, clip and optimizer as the loop."""
    from transformers import get_scheduler

    from selectmoe.data.encoding import pad_columns
    from selectmoe.training.loop import forward_backward, global_counts

    model = factory()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.train.lr)
    n_steps = len(rows) // spec.train.batch_size
    sched = get_scheduler(spec.scheduler, opt, num_warmup_steps=0, num_training_steps=n_steps)
    ga = spec.train.batch_size // spec.train.micro_batch_size
    tokens, t0 = 0, None
    for step in range(n_steps):
        if step == warmup_steps:
            t0, tokens = time.perf_counter(), 0
        chunk = rows[step * spec.train.batch_size : (step + 1) * spec.train.batch_size]
        group = []
        for i in range(ga):
            part = chunk[i * spec.train.micro_batch_size : (i + 1) * spec.train.micro_batch_size]
            group.append(
                pad_columns([r["input_ids"] for r in part], [r["labels"] for r in part], spec.pad_token_id)
            )
        counts = global_counts(group, spec.quality_token_scope)
        forward_backward(model, group, counts, count_kwargs=spec.count_kwargs, forward_kwargs=spec.forward_kwargs,
                         on_output=lambda out, mb: spec.metrics_fn(out, mb) if spec.metrics_fn else None)  # fmt: skip
        torch.nn.utils.clip_grad_norm_(params, spec.train.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(counts["n_tokens"])
    wall = time.perf_counter() - t0
    return {"tokens_per_s": tokens / wall, "steps_timed": n_steps - warmup_steps, "wall_s": wall}


def hf_trainer_loop(factory, rows, *, spec, warmup_steps: int, out_dir: str) -> dict:
    """The HF ``Trainer`` anchor: same model, rows (in order), micro-batches, GA, AdamW, clip; one process.

    Tokens/s over the steps after ``warmup_steps``: the collator counts each micro-batch's non-pad tokens,
    a callback stamps each optimizer step's end."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from selectmoe.data.encoding import pad_columns

    tokens: list[int] = []

    def collator(items):
        batch = pad_columns([r["input_ids"] for r in items], [r["labels"] for r in items], spec.pad_token_id)
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    ga = spec.train.batch_size // spec.train.micro_batch_size
    n_steps = len(rows) // spec.train.batch_size
    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=spec.train.micro_batch_size, gradient_accumulation_steps=ga,
        max_steps=n_steps, learning_rate=spec.train.lr, lr_scheduler_type=spec.scheduler, weight_decay=0.0,
        max_grad_norm=spec.train.max_grad_norm, report_to="none", save_strategy="no", logging_strategy="no",
        use_cpu=True, dataloader_num_workers=0, seed=spec.train.seed, disable_tqdm=True,
        remove_unused_columns=False, train_sampling_strategy="sequential",
    )  # fmt: skip
    model = factory()
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=[Stamp()])
    trainer.train()
    timed = tokens[warmup_steps * ga : n_steps * ga]
    wall = stamps[n_steps - 1] - stamps[warmup_steps - 1]
    return {"tokens_per_s": sum(timed) / wall, "steps_timed": n_steps - warmup_steps, "wall_s": wall}


def ray_loop(spec, rows) -> dict:
    import ray
    import ray.data
    from ray.train import UserCallback

    from selectmoe.training.loop import fit

    reports: list[dict] = []

    @ray.remote(num_cpus=0)
    class Sink:
        def __init__(self):
            self.items = []

        def put(self, rows):
            self.items.extend(rows)

        def get(self):
            return self.items

    sink = Sink.remote()

    class Collect(UserCallback):
        def __init__(self, sink):
            self.sink = sink

        def after_report(self, run_context, metrics, checkpoint):
            report = dict(metrics[0])  # rank 0's; every log step since the last report is in log_history
            ray.get(self.sink.put.remote(report.pop("log_history", None) or [report]))

    ds = ray.data.from_items(rows).materialize()
    t0 = time.perf_counter()
    result = fit(spec, ds, name="bench", use_gpu=False, callbacks=[Collect(sink)])
    wall = time.perf_counter() - t0
    reports = ray.get(sink.get.remote())
    tps = [r["tokens_per_s"] for r in reports[1:] if "tokens_per_s" in r] or [
        r["tokens_per_s"] for r in reports
    ]
    return {
        "tokens_per_s": float(np.mean(tps)),
        "reports": len(reports),
        "fit_wall_s": wall,
        "steps": result.steps,
    }


def cpu_compare(args) -> dict:
    import ray

    from selectmoe.config import TrainingConfig
    from selectmoe.stages.warmup import GateMetrics, SelectorModelFactory, export_params, import_params
    from selectmoe.training.loop import LoopSpec

    with tempfile.TemporaryDirectory(prefix="bench-warmup-") as tmp:
        model_dir, vocab, pad = _make_model_dir(Path(tmp), args.hidden)
        factory = SelectorModelFactory(model_dir, "full_rank", {}, 16, 64)
        n_rows = args.steps * args.batch_size
        rows = _rows(n_rows, args.length, vocab)
        spec = LoopSpec(
            model_fn=factory, export_fn=export_params, import_fn=import_params, n_rows=n_rows, pad_token_id=pad,
            train=TrainingConfig(lr=1e-3, epochs=1, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                                 checkpoint_every=10**6, log_every=args.log_every, gradient_checkpointing=False,
                                 max_failures=0, storage_path=str(Path(tmp) / "ray")),
            shuffle=False,
            count_kwargs=("num_samples_in_batch", "num_quality_tokens_in_batch"),
            forward_kwargs={"output_router_logits": True}, metrics_fn=GateMetrics("all"),
        )  # fmt: skip
        torch.set_num_threads(1)  # a Ray worker with 1 CPU gets 1 thread: compare like with like
        bare = bare_loop(factory, rows, spec=spec, warmup_steps=args.log_every)
        hf = hf_trainer_loop(
            factory, rows, spec=spec, warmup_steps=args.log_every, out_dir=str(Path(tmp) / "hf")
        )
        if not ray.is_initialized():
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        train = ray_loop(spec, rows)
    return {
        "mode": "cpu_compare",
        "steps": args.steps,
        "batch_size": args.batch_size,
        "micro_batch_size": args.micro_batch_size,
        "length": args.length,
        "bare_tokens_per_s": round(bare["tokens_per_s"], 1),
        "ray_tokens_per_s": round(train["tokens_per_s"], 1),
        "hf_trainer_tokens_per_s": round(hf["tokens_per_s"], 1),
        "ratio": round(train["tokens_per_s"] / bare["tokens_per_s"], 3),
        "ratio_vs_hf_trainer": round(train["tokens_per_s"] / hf["tokens_per_s"], 3),
        "hf_trainer_vs_bare": round(hf["tokens_per_s"] / bare["tokens_per_s"], 3),
        "ray_fit_wall_s": round(train["fit_wall_s"], 1),
        "goal": ">= 0.95",
    }


def olmoe_shape(args) -> dict:
    if not torch.cuda.is_available():
        return {"mode": "olmoe_shape", "skipped": "no CUDA device"}
    from selectmoe.model import apply_trainable
    from selectmoe.model.configuration_select_moe import SelectMoeConfig
    from selectmoe.model.modeling_select_moe import SelectMoeForCausalLM
    from selectmoe.training.loop import forward_backward, global_counts

    cfg = SelectMoeConfig(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, max_position_embeddings=4096,
        pad_token_id=1, eos_token_id=50279, bos_token_id=None,
    )  # fmt: skip
    device = torch.device("cuda")
    torch.manual_seed(0)
    with torch.device("meta"):
        model = SelectMoeForCausalLM(cfg)
    model = model.to_empty(device=device).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    apply_trainable(model, "full_rank", lora_dropout=0.0)  # trainable -> fp32
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    rng = np.random.default_rng(0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    tokens, t0 = 0, None
    for step in range(args.steps):
        if step == 2:
            torch.cuda.synchronize()
            t0, tokens = time.perf_counter(), 0
        group = []
        for _ in range(args.batch_size // args.micro_batch_size):
            ids = torch.as_tensor(
                rng.integers(5, 50000, size=(args.micro_batch_size, args.length)), device=device
            )
            group.append({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)})
        counts = global_counts(group, "all")
        forward_backward(model, group, counts, count_kwargs=("num_samples_in_batch", "num_quality_tokens_in_batch"),
                         forward_kwargs={"output_router_logits": True}, autocast=autocast)  # fmt: skip
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(counts["n_tokens"])
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return {
        "mode": "olmoe_shape",
        "device": torch.cuda.get_device_name(0),
        "params_total_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
        "params_trainable_m": round(sum(p.numel() for p in params) / 1e6, 3),
        "batch_size": args.batch_size,
        "micro_batch_size": args.micro_batch_size,
        "length": args.length,
        "gradient_checkpointing": args.gradient_checkpointing,
        "tokens_per_s": round(tokens / wall, 1),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--hidden", type=int, default=0, help="tiny model hidden size override (0: tiny default)")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--olmoe-shape", action="store_true")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.olmoe_shape:
        if args.length == 128:
            args.length = 1024
        if args.steps == 30:
            args.steps = 8
        res = olmoe_shape(args)
    else:
        res = cpu_compare(args)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
