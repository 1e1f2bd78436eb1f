"""Quick check of the demo target: does a finetune on clean demo data raise its eval accuracy, bad lower it?

Plain PyTorch + peft, no Ray, minutes on 2 cores (the pipeline's answer is ``benchmarks/demo_seeds.py``).
On the assets and ingest of a ``selectmoe demo --out OUT`` run: the target is rebuilt with each
``--pretrain-steps`` on the held-out clean corpus (as ``selectmoe.demo.build_demo_target`` does), then LoRA
with the demo preset's finetune settings (r, alpha, dropout, modules, lr, batch, epochs, label mode) is
trained on arms of ``--rows`` pool rows drawn by the hidden labels: clean only, the pool's bad share, bad
only. Accuracy = argmax of the summed log-likelihood of the four choices (lm-eval's ``acc``) on the demo
eval file. Constant lr, one process: a sanity check of the demo's design, not the pipeline's numbers.

    PYTHONPATH=$PWD python benchmarks/demo_target_check.py --out outputs/demo --pretrain-steps 100 200
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

import numpy as np
import torch


def choice_correct(model, tokenizer, eval_path: Path, batch: int = 128) -> np.ndarray:
    """Per question, 1 when the correct choice has the highest summed log-likelihood after the prompt
    (lm-eval's ``acc``); the choices of many questions go through the model together."""
    from selectmoe.eval_tasks import demo_prompt_template

    template = demo_prompt_template().replace("{{question.strip()}}", "{q}")
    rows = [json.loads(line) for line in eval_path.read_text().splitlines() if line.strip()]
    seqs, ctx_lens = [], []
    for row in rows:
        ctx = tokenizer(template.format(q=row["question"].strip()))["input_ids"]
        for c in row["choices"]:
            seqs.append(ctx + tokenizer(c)["input_ids"])
            ctx_lens.append(len(ctx))
    scores = np.zeros(len(seqs))
    order = sorted(range(len(seqs)), key=lambda j: len(seqs[j]))
    model.eval()
    with torch.no_grad():
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            ids = torch.full((len(idx), max(len(seqs[j]) for j in idx)), tokenizer.pad_token_id)
            mask = torch.zeros_like(ids)
            for k, j in enumerate(idx):
                ids[k, : len(seqs[j])], mask[k, : len(seqs[j])] = torch.tensor(seqs[j]), 1
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
            for k, j in enumerate(idx):
                s, c = seqs[j], ctx_lens[j]
                scores[j] = logp[k, torch.arange(c - 1, len(s) - 1), torch.tensor(s[c:])].sum().item()
    n_choices = len(rows[0]["choices"])
    best = scores.reshape(len(rows), n_choices).argmax(axis=1)
    return (best == np.array([r["answer"] for r in rows])).astype(np.float64)


def lora_finetune(model, tokenizer, records: list[dict], ft, *, seed: int):
    """The finetune stage's LoRA settings in a plain loop (constant lr); returns the peft model."""
    from peft import LoraConfig, get_peft_model

    from selectmoe.data.encoding import ChatEncoder, EncodingSpec, pad_batch

    torch.manual_seed(seed)
    lora = LoraConfig(
        r=ft.lora_r,
        lora_alpha=ft.lora_alpha,
        lora_dropout=ft.lora_dropout,
        target_modules=list(ft.lora_target_modules),
    )
    peft_model = get_peft_model(model, lora)
    encoder = ChatEncoder(tokenizer, EncodingSpec(max_length=ft.max_length, label_mode=ft.label_mode))
    encoded = [encoder.encode(r["messages"]) for r in records]
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=ft.lr)
    rng = random.Random(seed)
    peft_model.train()
    for _ in range(ft.epochs):
        order = rng.sample(range(len(encoded)), len(encoded))
        for start in range(0, len(order) - ft.batch_size + 1, ft.batch_size):
            batch = pad_batch(
                [encoded[i] for i in order[start : start + ft.batch_size]], tokenizer.pad_token_id
            )
            loss = peft_model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return peft_model


def arms(ingest_dir: str, labels_path: str, rows: int, *, seed: int) -> dict[str, list[dict]]:
    from selectmoe.data.ingest import iter_ingested_records
    from selectmoe.demo import read_demo_labels

    labels = read_demo_labels(labels_path)
    pool = list(iter_ingested_records(ingest_dir))
    clean = [r for r in pool if labels[r["id"]] == "clean"]
    bad = [r for r in pool if labels[r["id"]] != "clean"]
    n_bad = round(rows * len(bad) / len(pool))
    rng = random.Random(seed)
    return {
        "clean only": rng.sample(clean, rows),
        f"pool mix ({n_bad / rows:.0%} bad)": rng.sample(clean, rows - n_bad) + rng.sample(bad, n_bad),
        "bad only": rng.sample(bad, rows),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="outputs/demo", help="a `selectmoe demo --out` dir (ingest done)")
    parser.add_argument("--pretrain-steps", type=int, nargs="+", default=[200])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", type=int, default=213, help="rows per arm (the demo selects 10%% = 213)")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from selectmoe.config import load_config
    from selectmoe.demo import _pretrain, _read_records
    from selectmoe.evaluation.paired import paired_difference
    from selectmoe.model.tiny import build_tiny_dense_target

    cfg = load_config("demo", [f"output_dir={Path(args.out).resolve()}"])
    root = Path(cfg.demo.dir)
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    corpus = _read_records(sorted((root / "pretrain_corpus").glob("pool-*.jsonl")))
    data = arms(cfg.data.ingest_dir, str(root / "pool_labels.jsonl"), args.rows, seed=cfg.seed)
    eval_path = root / "eval" / "demo_eval.jsonl"
    names = list(data)
    print(
        "| pre-training steps | base | "
        + " | ".join(names)
        + f" | {names[0]} - {names[1]} (paired 95% interval) | {names[0]} - base |\n"
        + "|---" * (len(names) + 4)
        + "|"
    )
    for steps in args.pretrain_steps:
        target = build_tiny_dense_target(tokenizer, arch="llama", seed=cfg.seed)
        _pretrain(target, tokenizer, corpus, cfg.demo, steps=steps, seed=cfg.seed + 3)
        state = {k: v.clone() for k, v in target.state_dict().items()}
        base = choice_correct(target, tokenizer, eval_path)
        cells, correct = [f"{base.mean():.3f}"], {}
        for name, records in data.items():
            correct[name] = []
            for seed in args.seeds:
                target.load_state_dict(state)
                tuned = lora_finetune(target, tokenizer, records, cfg.finetune, seed=seed)
                correct[name].append(choice_correct(tuned, tokenizer, eval_path))
                target = tuned.unload()
            accs = [c.mean() for c in correct[name]]
            se = statistics.stdev(accs) / len(accs) ** 0.5 if len(accs) > 1 else float("nan")
            cells.append(f"{statistics.mean(accs):.3f} ± {se:.3f}")
        d = paired_difference(correct[names[0]], correct[names[1]])
        vs_base = paired_difference(correct[names[0]], [base] * len(args.seeds))
        cells.append(f"{d.mean:+.3f} ({d.low:+.3f} to {d.high:+.3f})")
        cells.append(f"{vs_base.mean:+.3f} ({vs_base.low:+.3f} to {vs_base.high:+.3f})")
        print(f"| {steps} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
