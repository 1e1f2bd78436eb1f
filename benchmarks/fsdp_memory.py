"""Peak memory per worker, FSDP vs DDP: LoRA on a ~100M-parameter Llama through the shared loop.

Two ``loop.fit`` runs on 2 CPU workers (gloo), same rows, seed and batches: ``strategy=ddp`` (every
worker holds the whole fp32 model) and ``strategy=fsdp`` (FSDP2, one unit per decoder layer: each worker
holds half the shards plus one layer gathered at a time). The figure is the loop's ``peak_mem_mb``
(rank 0's peak resident set during training, after sharding), the parameter memory each worker holds
(``param_mb``), and the final LoRA tensors' largest difference between the two runs. Then the same
factory and ``shard_model`` in plain ``torch.distributed`` (gloo, 2 spawned processes, 3 steps): the peak
resident set without Ray Train's worker around it.

    python benchmarks/fsdp_memory.py [--layers 14] [--hidden 768] [--steps 4] [--length 128]
"""

from __future__ import annotations

import argparse
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


def build_target(root: Path, *, layers: int, hidden: int, vocab: int) -> tuple[str, int]:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float()
    model.save_pretrained(root / "target")
    return str(root / "target"), sum(p.numel() for p in model.parameters())


def _plain_worker(rank: int, world: int, model_dir: str, strategy: str, args, port: int, out) -> None:
    """One rank of the plain torch.distributed (gloo) run: the same factory and ``shard_model`` as the loop,
    3 forward/backward steps of 2 rows, peak resident set sampled every 20 ms after wrapping."""
    import threading

    import torch.distributed as dist

    from selectmoe.stages.finetune import LoraModelFactory
    from selectmoe.training.fsdp import shard_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = LoraModelFactory(model_dir, 8, 16, 0.0, ["q_proj", "v_proj"])()
    if strategy == "fsdp":
        model = shard_model(model, torch.device("cpu"), bf16=False)
    else:
        model = torch.nn.parallel.DistributedDataParallel(model)
    page = os.sysconf("SC_PAGE_SIZE")
    peak = [0]

    def sample() -> None:
        while True:
            with open("/proc/self/statm", encoding="ascii") as fh:
                peak[0] = max(peak[0], int(fh.read().split()[1]) * page)
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    ids = torch.randint(3, args.vocab, (2, args.length), generator=torch.Generator().manual_seed(rank))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
    time.sleep(0.05)
    if rank == 0:
        out.put(peak[0] / 2**20)
    dist.destroy_process_group()


def plain_peaks(model_dir: str, args) -> dict[str, float]:
    import socket

    import torch.multiprocessing as mp

    peaks = {}
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by glibc at start-up of the spawned ranks
    for strategy in ("ddp", "fsdp"):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        mp.start_processes(_plain_worker, args=(2, model_dir, strategy, args, port, queue), nprocs=2,
                           start_method="spawn")  # fmt: skip
        peaks[strategy] = queue.get(timeout=60)
    return peaks


def main(argv=None) -> int:
    import ray
    import ray.data

    from selectmoe.config import TrainingConfig
    from selectmoe.stages.finetune import LoraModelFactory, export_lora, import_lora
    from selectmoe.training.loop import LoopSpec, fit

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=14)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-fsdp-") as tmp:
        model_dir, n_params = build_target(
            Path(tmp), layers=args.layers, hidden=args.hidden, vocab=args.vocab
        )
        rng = np.random.default_rng(0)
        batch = 4
        rows = []
        for _ in range(args.steps * batch):
            ids = rng.integers(3, args.vocab, size=args.length).astype(np.int32).tolist()
            rows.append({"input_ids": ids, "labels": ids})
        factory = LoraModelFactory(model_dir, 8, 16, 0.0, ["q_proj", "v_proj"])
        if not ray.is_initialized():
            # a fixed mmap threshold: freed large tensors go back to the OS, so the resident set measures
            # what training holds (glibc's adaptive threshold keeps the freed full model of each rank)
            env = {"MALLOC_MMAP_THRESHOLD_": "65536", "RAY_TRAIN_V2_ENABLED": "1"}
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": env})  # fmt: skip
        ds = ray.data.from_items(rows).materialize()
        results = {}
        for strategy in ("ddp", "fsdp"):
            spec = LoopSpec(
                model_fn=factory, export_fn=export_lora, import_fn=import_lora, n_rows=len(rows), pad_token_id=0,
                train=TrainingConfig(lr=1e-3, epochs=1, batch_size=batch, micro_batch_size=2, strategy=strategy,
                                     log_every=1, checkpoint_every=10**6, bf16=False, gradient_checkpointing=False,
                                     num_workers=2, max_failures=0, storage_path=str(Path(tmp) / "ray")),
            )  # fmt: skip
            res = fit(spec, ds, name=f"bench-{strategy}", use_gpu=False, metrics_dir=Path(tmp) / strategy)
            log = (Path(tmp) / strategy / "train_metrics.jsonl").read_text().splitlines()
            print(strategy, [round(json.loads(x)["peak_mem_mb"]) for x in log], flush=True)
            results[strategy] = (res.metrics, res.trainable_state())
        plain = plain_peaks(model_dir, args)
        diff = max(
            float((results["ddp"][1][k] - results["fsdp"][1][k]).abs().max()) for k in results["ddp"][1]
        )
    ddp_mb, fsdp_mb = (results[s][0]["peak_mem_mb"] for s in ("ddp", "fsdp"))
    out = {
        "params_m": round(n_params / 1e6, 1),
        "fp32_model_mb": round(n_params * 4 / 2**20, 1),
        "workers": 2,
        "ddp_peak_mem_mb_per_worker": round(ddp_mb, 1),
        "fsdp_peak_mem_mb_per_worker": round(fsdp_mb, 1),
        "fsdp_over_ddp": round(fsdp_mb / ddp_mb, 3),
        "ddp_param_mb_per_worker": round(results["ddp"][0]["param_mb"], 1),
        "fsdp_param_mb_per_worker": round(results["fsdp"][0]["param_mb"], 1),
        "plain_gloo_ddp_peak_mb": round(plain["ddp"], 1),
        "plain_gloo_fsdp_peak_mb": round(plain["fsdp"], 1),
        "plain_gloo_fsdp_over_ddp": round(plain["fsdp"] / plain["ddp"], 3),
        "ddp_tokens_per_s": round(results["ddp"][0]["tokens_per_s"], 1),
        "fsdp_tokens_per_s": round(results["fsdp"][0]["tokens_per_s"], 1),
        "max_abs_diff_lora": diff,
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
