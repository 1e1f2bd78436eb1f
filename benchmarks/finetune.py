"""Finetune-stage throughput: one LoRA epoch through the Ray Train loop vs a plain HF/peft loop.

    python benchmarks/finetune.py                # CPU: tiny Llama target, ratio Ray Train / plain loop
    python benchmarks/finetune.py --real-shape   # 1 GPU: Qwen2.5-1.5B shape, random weights, one LoRA step

Default mode: the same selection (``--rows`` chat rows, encoded by the same ``ChatEncoder``) and the same
batch arithmetic (``--batch-size`` global, ``--micro-batch-size``, one worker) on both sides.

- *plain*: in this process, a peft LoRA model from the same :class:`LoraModelFactory`, the loop's own
  ``pad_columns``, AdamW + linear schedule, loss normalised per global batch like the loop;
  ``torch.set_num_threads(--threads)`` (default 1, which is what Ray gives a 1-CPU train worker).
- *ray*: :func:`selectmoe.stages.finetune.run_finetune` end to end (Ray Data read + encode, TorchTrainer
  start, epoch, checkpoints, adapter save). Two figures: *steady* = the loop's own ``tokens_per_s``
  (mean over its reports: the per-step cost of the Ray loop) and *end-to-end* = epoch tokens / stage wall
  (Ray's fixed start-up cost included, ~15 s on this box).

``--real-shape`` (skips cleanly without CUDA): Qwen2.5-1.5B architecture with random bf16 weights, peft
LoRA with the LESS settings (r 128, alpha 512, dropout 0.1 on q/k/v/o), one optimizer step of
``--micro-batch-size`` x ``--seq-len`` tokens (after one warm-up step); prints tokens/s and peak memory.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Qwen/Qwen2.5-1.5B config.json (no hub access here).
QWEN25_15B = dict(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    hidden_act="silu",
)


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "epsilon",
        "zeta",
        "eta",
        "theta",
        "iota",
        "kappa",
        "lambda",
        "mu",
        "nu",
        "xi",
        "omicron",
        "pi",
        "rho",
    ]
    rows = []
    for i in range(n):
        q = " ".join(rng.choices(words, k=rng.randint(8, 40)))
        a = " ".join(rng.choices(words, k=rng.randint(16, 120)))
        rows.append(
            {
                "dataset": "bench",
                "id": f"b{i}",
                "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            }
        )
    return rows


def _plain_epoch(cfg, factory, encoded, pad_id: int, threads: int) -> dict:
    """One epoch of a plain peft loop over ``encoded`` with the same batch arithmetic as the Ray loop."""
    from transformers import get_scheduler

    from selectmoe.data.encoding import pad_columns
    from selectmoe.training.batching import grad_accum_steps, steps_per_epoch

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    model = factory()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    ga = grad_accum_steps(cfg.batch_size, cfg.micro_batch_size, 1)
    steps = steps_per_epoch(len(encoded), cfg.batch_size, 1)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_scheduler(
        "linear", opt, num_warmup_steps=math.ceil(cfg.warmup_ratio * steps), num_training_steps=steps
    )
    tokens, losses = 0, []
    t0 = time.perf_counter()
    for step in range(steps):
        group = []
        for i in range(ga):
            lo = (step * ga + i) * cfg.micro_batch_size
            chunk = encoded[lo : lo + cfg.micro_batch_size]
            group.append(pad_columns([e.input_ids for e in chunk], [e.labels for e in chunk], pad_id))
        n_items = sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in group)
        step_loss = 0.0
        for mb in group:
            out = model(**mb, num_items_in_batch=torch.tensor(max(n_items, 1)))
            out.loss.backward()
            step_loss += float(out.loss.detach())
            tokens += int(mb["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(step_loss)
    wall = time.perf_counter() - t0
    return {
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def bench_cpu(args) -> dict:
    import ray

    from selectmoe.config import FinetuneConfig
    from selectmoe.data.encoding import ChatEncoder, EncodingSpec
    from selectmoe.model.tiny import build_tiny_dense_target, train_bpe_tokenizer
    from selectmoe.stages.finetune import METRICS_LOG, LoraModelFactory, prepare_tokenizer, run_finetune

    tmp = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    rows = _rows(args.rows)
    tokenizer = train_bpe_tokenizer([m["content"] for r in rows for m in r["messages"]], vocab_size=512)
    target = tmp / "target"
    build_tiny_dense_target(tokenizer, seed=0).save_pretrained(target)
    tokenizer.save_pretrained(target)
    sel = tmp / "selected_data.jsonl"
    sel.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = FinetuneConfig(
        base_model=str(target),
        train_files={"bench": str(sel)},
        output_dir=str(tmp / "finetune"),
        storage_path=str(tmp / "ray_results"),
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        lr=1e-3,
        epochs=1,
        batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size,
        max_length=args.max_length,
        num_workers=1,
        use_gpu=False,
        checkpoint_every=10**6,
        log_every=1,
        seed=0,
    )
    tok, _ = prepare_tokenizer(cfg)
    encoded = ChatEncoder(
        tok, EncodingSpec(max_length=cfg.max_length, label_mode=cfg.label_mode)
    ).encode_many([r["messages"] for r in rows])
    factory = LoraModelFactory(
        cfg.base_model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, list(cfg.lora_target_modules)
    )
    plain = _plain_epoch(cfg, factory, encoded, tok.pad_token_id, args.threads)

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    result = run_finetune(cfg)
    wall = time.perf_counter() - t0
    ray.shutdown()
    run = result.runs["bench"]
    logged = [
        json.loads(x) for x in (Path(cfg.output_dir) / "bench" / METRICS_LOG).read_text().splitlines() if x
    ]
    steady = [m["tokens_per_s"] for m in logged if "tokens_per_s" in m]
    steady_tps = sum(steady) / len(steady)
    epoch_tokens = plain["tokens"]
    out = {
        "mode": "cpu-tiny",
        "rows": args.rows,
        "steps": run.steps,
        "epoch_tokens": epoch_tokens,
        "threads_plain": args.threads,
        "plain_tokens_per_s": round(plain["tokens_per_s"], 1),
        "ray_steady_tokens_per_s": round(steady_tps, 1),
        "ray_end_to_end_tokens_per_s": round(epoch_tokens / wall, 1),
        "ratio_steady": round(steady_tps / plain["tokens_per_s"], 3),
        "ratio_end_to_end": round(epoch_tokens / wall / plain["tokens_per_s"], 3),
        "plain_wall_s": round(plain["wall_s"], 2),
        "ray_stage_wall_s": round(wall, 2),
        "loss_plain": [round(plain["first_loss"], 3), round(plain["last_loss"], 3)],
        "loss_ray": [round(run.first_loss, 3), round(run.last_loss, 3)],
    }
    return out


def bench_real_shape(args) -> dict:
    if not torch.cuda.is_available():
        return {"mode": "real-shape", "skipped": "no CUDA device"}
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    device = torch.device("cuda")
    with device:
        model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_15B)).to(torch.bfloat16)
    for p in model.parameters():
        p.requires_grad_(False)
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=128, lora_alpha=512, lora_dropout=0.1,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    )  # fmt: skip
    model = get_peft_model(model, lora)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-5)
    b, t = args.micro_batch_size, args.seq_len
    ids = torch.randint(0, QWEN25_15B["vocab_size"], (b, t), device=device)

    def step() -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    step()  # warm-up (allocator, kernels)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    loss = 0.0
    for _ in range(args.steps):
        loss = step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / args.steps
    return {
        "mode": "real-shape",
        "device": torch.cuda.get_device_name(0),
        "model": "Qwen2.5-1.5B shape, random bf16 weights, LoRA r128 q/k/v/o",
        "trainable_params": sum(p.numel() for p in params),
        "micro_batch": b,
        "seq_len": t,
        "gradient_checkpointing": args.gradient_checkpointing,
        "step_s": round(wall, 4),
        "tokens_per_s": round(b * t / wall, 1),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "loss": round(loss, 3),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--real-shape", action="store_true")
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--json", type=str, default=None, help="also write the result here")
    args = p.parse_args(argv)
    if args.real_shape and args.micro_batch_size == 8 and "--micro-batch-size" not in (argv or sys.argv):
        args.micro_batch_size = 4  # LESS per-device batch for Qwen profiles
    out = bench_real_shape(args) if args.real_shape else bench_cpu(args)
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
