"""Host-memory peak of loading a model for score, train and convert (~100M parameters by default).

Each load runs alone in a fresh child process that first imports everything the load needs, then samples
its anonymous resident memory (``RssAnon`` in ``/proc/self/status``, every millisecond, on a thread) while
it loads. Anonymous memory is what the loads allocate; the memory-mapped safetensors pages they read are
file-backed page cache (shared by every process on the node that reads the same file, evictable), not
counted (the resident peak with them, ``VmHWM``, is printed for reference). Bounds (issue 22): score (``load_selector`` in
bf16) and train (the warmup ``model_fn`` in bf16) peak at the model's bf16 size + 10%; convert (fp32 in and
out, logits verified) at its fp32 size + 10%: never two fp32 copies.

    python benchmarks/load_memory.py [--dir /tmp/load-memory] [--hidden 512] [--layers 6] [--vocab 32000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOUND = 1.10  # peak <= 1.1 x the model's size in the loaded dtype


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status (Linux only)")


def _anon_bytes() -> int:
    return _status_bytes("RssAnon")


class PeakSampler:
    """Peak ``RssAnon`` above the level at start, sampled every ``interval_s`` on a thread."""

    def __init__(self, interval_s: float = 0.001):
        self.interval_s = interval_s
        self.base = _anon_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _anon_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _anon_bytes())

    @property
    def delta(self) -> int:
        return self.peak - self.base


def build_source(root: Path, *, hidden: int, layers: int, vocab: int, experts: int) -> Path:
    """A random OLMoE checkpoint (fp32 safetensors + a tiny tokenizer) at ``root / "olmoe"``."""
    import torch
    from transformers import OlmoeConfig, OlmoeForCausalLM

    from selectmoe.model.tiny import train_bpe_tokenizer

    src = root / "olmoe"
    if (src / "config.json").is_file():
        return src
    cfg = OlmoeConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, num_experts=experts,
        num_experts_per_tok=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    OlmoeForCausalLM(cfg).save_pretrained(src)
    train_bpe_tokenizer([f"row {i} of the fox {i % 5}" for i in range(80)], vocab_size=300).save_pretrained(
        src
    )
    return src


def _child(kind: str, path: str, out: str | None) -> dict:
    """One load in this (fresh) process; imports first, so the sampler sees only the load."""
    import gc

    import torch

    import selectmoe.model
    import selectmoe.model.artifact
    import selectmoe.model.convert
    import selectmoe.stages.warmup  # noqa: F401

    gc.collect()
    rss0 = _status_bytes("VmRSS")
    with PeakSampler() as peak:
        if kind == "score":
            from selectmoe.model import load_selector

            model = load_selector(path, dtype="bfloat16")[0]
        elif kind == "train":
            from selectmoe.stages.warmup import SelectorModelFactory

            model = SelectorModelFactory(path, "full_rank", {}, 16, 64)(torch.bfloat16)
        elif kind == "convert":
            from selectmoe.model import convert_olmoe

            convert_olmoe(path, out)
            model = None
        else:
            raise ValueError(kind)
    if model is None:  # convert: the size of what it wrote (fp32)
        from safetensors import safe_open

        nbytes = 0
        for f in Path(out).glob("*.safetensors"):
            with safe_open(str(f), "pt") as st:
                for k in st.keys():  # noqa: SIM118
                    t = st.get_slice(k)
                    n = 1
                    for d in t.get_shape():
                        n *= d
                    nbytes += n * 4
        params = nbytes // 4
    else:
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        params = sum(p.numel() for p in model.parameters())
    rss = (
        _status_bytes("VmHWM") - rss0
    )  # resident incl. the mapped checkpoint pages (page cache), for reference
    return {"kind": kind, "params": params, "model_mb": nbytes / 2**20, "peak_mb": peak.delta / 2**20,
            "ratio": peak.delta / nbytes, "peak_rss_mb": rss / 2**20}  # fmt: skip


def measure(kind: str, path: Path, out: Path | None = None) -> dict:
    """Run one load in a child process; its figures."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, str(path)]
    if out is not None:
        cmd += ["--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=str(ROOT))
    if res.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_all(root: Path, *, hidden: int = 512, layers: int = 6, vocab: int = 32000, experts: int = 8) -> list:
    src = build_source(root, hidden=hidden, layers=layers, vocab=vocab, experts=experts)
    converted = root / "converted"
    rows = [measure("convert", src, converted)]
    rows += [measure(kind, converted) for kind in ("score", "train")]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=2, metavar=("KIND", "PATH"))
    ap.add_argument("--out")
    ap.add_argument("--dir", default="/tmp/load-memory")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--experts", type=int, default=8)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.child[0], args.child[1], args.out)))
        return
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    for row in run_all(root, hidden=args.hidden, layers=args.layers, vocab=args.vocab, experts=args.experts):
        ok = "PASS" if row["ratio"] <= BOUND else "FAIL"
        print(f"{row['kind']:8s} {row['params'] / 1e6:6.1f}M params  model {row['model_mb']:7.1f} MiB  "
              f"peak {row['peak_mb']:7.1f} MiB  ratio {row['ratio']:.3f}  {ok}  "
              f"(resident incl. mapped file pages {row['peak_rss_mb']:.0f} MiB)")  # fmt: skip


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
