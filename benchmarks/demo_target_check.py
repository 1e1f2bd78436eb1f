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

import torch


def choice_accuracy(model, tokenizer, eval_path: Path) -> float:
    """Share of questions whose correct choice has the highest summed log-likelihood after the prompt."""
    from selectmoe.eval_tasks import demo_prompt_template

    template = demo_prompt_template().replace("{{question.strip()}}", "{q}")
    rows = [json.loads(line) for line in eval_path.read_text().splitlines() if line.strip()]
    model.eval()
    hits = 0
    with torch.no_grad():
        for row in rows:
            ctx = tokenizer(template.format(q=row["question"].strip()))["input_ids"]
            seqs = [ctx + tokenizer(c)["input_ids"] for c in row["choices"]]
            ids = torch.full((len(seqs), max(map(len, seqs))), tokenizer.pad_token_id)
            mask = torch.zeros_like(ids)
            for j, s in enumerate(seqs):
                ids[j, : len(s)], mask[j, : len(s)] = torch.tensor(s), 1
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
            scores = [
                logp[j, torch.arange(len(ctx) - 1, len(s) - 1), torch.tensor(s[len(ctx) :])].sum().item()
                for j, s in enumerate(seqs)
            ]
            hits += int(max(range(len(scores)), key=scores.__getitem__) == row["answer"])
    return hits / len(rows)


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
    from selectmoe.model.tiny import build_tiny_dense_target

    cfg = load_config("demo", [f"output_dir={Path(args.out).resolve()}"])
    root = Path(cfg.demo.dir)
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    corpus = _read_records(sorted((root / "pretrain_corpus").glob("pool-*.jsonl")))
    data = arms(cfg.data.ingest_dir, str(root / "pool_labels.jsonl"), args.rows, seed=cfg.seed)
    eval_path = root / "eval" / "demo_eval.jsonl"
    print("| pre-training steps | base | " + " | ".join(data) + " |\n|---" * (len(data) + 2) + "|")
    for steps in args.pretrain_steps:
        target = build_tiny_dense_target(tokenizer, arch="llama", seed=cfg.seed)
        _pretrain(target, tokenizer, corpus, cfg.demo, steps=steps, seed=cfg.seed + 3)
        state = {k: v.clone() for k, v in target.state_dict().items()}
        cells = [f"{choice_accuracy(target, tokenizer, eval_path):.3f}"]
        for records in data.values():
            accs = []
            for seed in args.seeds:
                target.load_state_dict(state)
                tuned = lora_finetune(target, tokenizer, records, cfg.finetune, seed=seed)
                accs.append(choice_accuracy(tuned, tokenizer, eval_path))
                target = tuned.unload()
            se = statistics.stdev(accs) / len(accs) ** 0.5 if len(accs) > 1 else float("nan")
            cells.append(f"{statistics.mean(accs):.3f} ± {se:.3f}")
        print(f"| {steps} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
