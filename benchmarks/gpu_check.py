"""One prepared check of everything GPU-only, for the first few minutes a GPU is lent (issue 22).

One process, random weights at the real shapes (no downloads): the Select-MoE at OLMoE-1B-7B's shape (16
layers, d 2048, 64 experts top-8) and a Qwen2.5-1.5B-shaped LoRA target. Prints one
``CHECK <name> PASS|FAIL <figures>`` line per check and rewrites the JSON (``--out``) after every section,
so a run cut short still leaves its figures. Sections:

- ``env``: torch / CUDA / device, bf16, attention and experts kernels the model uses;
- ``precision``: gates and routers fp32 under bf16 autocast; ``cast_model`` leaves them bit-identical;
  gate scores bf16 vs fp32 (Spearman >= 0.999); bf16 batch invariance (alone vs padded batch);
- ``scoring``: tokens/s, MFU and peak memory of THE scoring function, with and without the IFD pass;
- ``training``: one warmup step (bf16, fp32 gates), one FSDP2 step (NCCL; gloo on CPU) and a checkpoint
  round trip of the trainable tensors; one LoRA step of the 1.5B target;
- ``sweep``: spherical k-means + silhouette on 1M x 1,024 features on the device at the ends of the default
  ``select.k_range``, projected to the full default sweep;
- ``pipeline``: the tiny demo pipeline end to end on an in-process Ray that has the GPU (``--cpu``: only with
  ``--pipeline``; it takes minutes on CPU).

``--cpu`` runs the same code at tiny shapes on CPU (the test suite runs it, so it never rots).

    python benchmarks/gpu_check.py [--cpu] [--out gpu_check.json] [--sections env,precision,...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

SECTIONS = ("env", "precision", "scoring", "training", "sweep", "pipeline")
# dense bf16 peak FLOP/s by device name (MFU's denominator)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


@dataclass(frozen=True)
class Shapes:
    """Model and workload sizes: the real ones on GPU, tiny ones with ``--cpu``."""

    moe: dict[str, int]
    target: dict[str, int]
    score_batch: int
    score_len: int
    n_rank: int  # samples in the bf16 vs fp32 rank correlation
    train_batch: int
    train_len: int
    sweep_rows: int
    sweep_dim: int


GPU_SHAPES = Shapes(
    moe=dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
             num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8),
    target=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                num_attention_heads=12, num_key_value_heads=2),
    score_batch=16, score_len=1024, n_rank=256, train_batch=4, train_len=1024,
    sweep_rows=1_000_000, sweep_dim=1024,
)  # fmt: skip
CPU_SHAPES = Shapes(
    moe=dict(vocab_size=512, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2),
    target=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2),
    score_batch=4, score_len=32, n_rank=24, train_batch=2, train_len=32,
    sweep_rows=3000, sweep_dim=32,
)  # fmt: skip


@dataclass
class Report:
    """Checks and figures, printed as they come and written to ``out`` after every section."""

    out: Path
    device: str
    results: dict[str, Any] = field(default_factory=dict)

    def check(self, section: str, name: str, ok: bool, **figures: Any) -> bool:
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in figures.items())
        print(f"CHECK {name} {'PASS' if ok else 'FAIL'} {shown}".rstrip(), flush=True)
        self.results.setdefault(section, {})[name] = {"pass": bool(ok), **figures}
        return ok

    def write(self) -> None:
        self.out.write_text(
            json.dumps({"device": self.device, "sections": self.results}, indent=1, default=str)
        )


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace(" ", "")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def build_select_moe(shapes: Shapes, device: torch.device, dtype=torch.float32, seed: int = 0):
    """A random Select-MoE at ``shapes.moe`` built on ``device`` (gate init std 0.02: a varied signal)."""
    from selectmoe.model import SelectMoeConfig, SelectMoeForCausalLM

    cfg = SelectMoeConfig(**shapes.moe, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1,
                          eos_token_id=2, quality_gate_init_std=0.02, quality_gate_init_bias=0.0)  # fmt: skip
    from selectmoe.model.precision import cast_model

    torch.manual_seed(seed)
    with torch.device(device):
        model = SelectMoeForCausalLM(cfg)
    return cast_model(model, dtype)  # gates and routers stay fp32


def random_batch(n: int, length: int, vocab: int, device: torch.device, seed: int = 0):
    """``n`` right-padded rows of lengths in [length/4, length] (the longest is ``length``)."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(length // 4, length + 1, (n,), generator=gen)
    lens[0] = length
    ids = torch.randint(3, vocab, (n, length), generator=gen)
    mask = (torch.arange(length)[None, :] < lens[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    return ids.to(device), mask.to(device), labels.to(device)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


# ------------------------------------------------------------------------------------------------ sections


def section_env(rep: Report, device: torch.device, shapes: Shapes, state: dict) -> None:
    import transformers

    info: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__}
    ok = True
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name, capability=f"{props.major}.{props.minor}", memory_gb=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda, bf16=torch.cuda.is_bf16_supported(), nccl=torch.distributed.is_nccl_available(),
            flash_sdp=torch.backends.cuda.flash_sdp_enabled(), mem_efficient_sdp=torch.backends.cuda.mem_efficient_sdp_enabled(),
        )  # fmt: skip
        ok = bool(info["bf16"] and info["nccl"])
    info["grouped_mm"] = hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")
    model = build_select_moe(CPU_SHAPES, torch.device("cpu"))
    info["attn_implementation"] = model.config._attn_implementation
    info["experts_implementation"] = getattr(model.config, "_experts_implementation", None)
    rep.check("env", "env", ok, **info)


def section_precision(rep: Report, device: torch.device, shapes: Shapes, state: dict) -> None:
    from selectmoe.model.precision import cast_model, fp32_modules
    from selectmoe.scoring.model import score_batch

    model = build_select_moe(shapes, device).eval()
    ids, mask, labels = random_batch(shapes.n_rank, shapes.score_len // 2, shapes.moe["vocab_size"], device)
    with torch.no_grad(), _autocast(device):
        out = model(input_ids=ids[:2], attention_mask=mask[:2], output_router_logits=True, use_cache=False)
    dtypes = {str(out.router_logits[0]["quality_score"].dtype), str(out.router_logits[0]["moe_logits"].dtype)}
    rep.check("precision", "gates_fp32_under_autocast", dtypes == {"torch.float32"}, dtypes=sorted(dtypes))

    def scores(m, rows):
        q = []
        for s in range(0, len(rows), shapes.score_batch):
            idx = rows[s : s + shapes.score_batch]
            q.append(score_batch(m, ids[idx], mask[idx], labels[idx], scope="all")["quality"])
        return np.concatenate(q)

    rows = list(range(shapes.n_rank))
    fp32 = scores(model, rows)
    keep = fp32_modules(model)
    before = {n: t.detach().clone() for name, m in keep.items() for n, t in m.named_parameters(prefix=name)}
    cast_model(model, torch.bfloat16)
    after = dict(model.named_parameters())
    exact = all(after[n].dtype == torch.float32 and torch.equal(after[n], t) for n, t in before.items())
    rep.check("precision", "cast_exact", exact, fp32_tensors=len(before))
    del before
    bf16 = scores(model, rows)
    rho = spearman(fp32, bf16)
    rep.check("precision", "bf16_vs_fp32_rank", rho >= 0.999, spearman=rho, n=len(rows),
              max_abs_diff=float(np.abs(fp32 - bf16).max()))  # fmt: skip
    alone = np.array([scores(model, [i])[0] for i in range(min(len(rows), 32))])
    batched = bf16[: len(alone)]
    rho_b = spearman(alone, batched)
    rep.check("precision", "bf16_batch_invariance", rho_b >= 0.999, spearman=rho_b,
              max_abs_diff=float(np.abs(alone - batched).max()))  # fmt: skip
    state["model"] = model  # bf16, fp32 gates: reused by scoring and training


def _forward_flops_per_token(cfg, length: int) -> float:
    """2 x active matmul parameters per token (top-k experts, lm head) + causal attention scores."""
    d, layers = cfg.hidden_size, cfg.num_hidden_layers
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = d // heads
    attn = d * d * 2 + 2 * d * kv * head_dim  # q, o + k, v
    experts = getattr(cfg, "num_experts_per_tok", 0) * 3 * d * cfg.intermediate_size
    router = getattr(cfg, "num_experts", 0) * d
    per_layer = attn + experts + router
    return 2 * (layers * per_layer + d * cfg.vocab_size) + 2 * layers * length * d  # causal: half of 4·T·d


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def section_scoring(rep: Report, device: torch.device, shapes: Shapes, state: dict) -> None:
    from selectmoe.scoring.model import answer_only_nll, score_batch

    model = state.get("model") or build_select_moe(shapes, device, torch.bfloat16).eval()
    b, t = shapes.score_batch, shapes.score_len
    ids, mask, labels = random_batch(b, t, shapes.moe["vocab_size"], device, seed=1)
    half = t // 2
    a_ids, a_mask, a_labels = (
        ids[:, :half].contiguous(),
        mask[:, :half].contiguous(),
        labels[:, :half].contiguous(),
    )
    reps = 5 if device.type == "cuda" else 2
    peak = _peak_flops(device)
    for ifd in (False, True):
        score_batch(model, ids, mask, labels, scope="all", response_labels=labels)  # warm up kernels
        _sync(device)
        _reset_peak(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            score_batch(model, ids, mask, labels, scope="all", response_labels=labels)
            if ifd:
                answer_only_nll(model, a_ids, a_mask, a_labels)
        _sync(device)
        dt = (time.perf_counter() - t0) / reps
        tokens = int(mask.sum()) + (int(a_mask.sum()) if ifd else 0)
        flops = _forward_flops_per_token(model.config, t) * b * t + (
            _forward_flops_per_token(model.config, half) * b * half if ifd else 0
        )
        mfu = flops / dt / peak if peak else float("nan")
        name = "scoring_ifd" if ifd else "scoring"
        ok = (mfu >= 0.30) if peak else math.isfinite(dt)
        rep.check("scoring", name, ok, tokens_per_s=tokens / dt, mfu=mfu, peak_gb=_peak_gb(device),
                  batch=f"{b}x{t}", seconds_per_batch=dt)  # fmt: skip


def _step(model, params, ids, mask, labels, device) -> float:
    opt = torch.optim.AdamW(params, lr=1e-3)
    with _autocast(device):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def section_training(rep: Report, device: torch.device, shapes: Shapes, state: dict) -> None:
    import torch.distributed as dist
    from safetensors.torch import load_file, save_file

    from selectmoe.model import apply_trainable
    from selectmoe.stages.warmup import export_params
    from selectmoe.training.fsdp import shard_model

    model = state.pop("model", None) or build_select_moe(shapes, device, torch.bfloat16)
    model = apply_trainable(model.train(), "full_rank")
    ids, mask, labels = random_batch(
        shapes.train_batch, shapes.train_len, shapes.moe["vocab_size"], device, 2
    )
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    _reset_peak(device)
    t0 = time.perf_counter()
    loss = _step(model, [p for p in model.parameters() if p.requires_grad], ids, mask, labels, device)
    _sync(device)
    dt = time.perf_counter() - t0
    moved = sum(
        not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if p.requires_grad
    )
    rep.check("training", "warmup_step", math.isfinite(loss) and moved == len(names), loss=loss,
              seconds=dt, tokens_per_s=int(mask.sum()) / dt, peak_gb=_peak_gb(device), trainable=len(names))  # fmt: skip
    del before

    # FSDP2 on one rank (NCCL on GPU, gloo on CPU), then the checkpoint round trip of the full tensors
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{tmp / 'store'}", rank=0, world_size=1)
    try:
        sharded = shard_model(model, device, bf16=True)
        params = [p for p in sharded.parameters() if p.requires_grad]
        _reset_peak(device)
        t0 = time.perf_counter()
        loss = _step(sharded, params, ids, mask, labels, device)
        _sync(device)
        dt = time.perf_counter() - t0
        full = {k: v.full_tensor().cpu() for k, v in export_params(sharded).items()}
        save_file(full, str(tmp / "trainable.safetensors"))
        from torch.distributed.tensor import distribute_tensor

        loaded = load_file(str(tmp / "trainable.safetensors"))
        named = dict(sharded.named_parameters())
        with torch.no_grad():  # zero the shards, then restore them from the full tensors on disk
            for p in params:
                p.zero_()
            for k, v in loaded.items():
                p = named[k]
                p.copy_(distribute_tensor(v.to(device=device, dtype=p.dtype), p.device_mesh, p.placements))
        back = {k: v.full_tensor().cpu() for k, v in export_params(sharded).items()}
        exact = back.keys() == full.keys() and all(torch.equal(back[k], full[k]) for k in full)
        rep.check("training", "fsdp2_step_checkpoint", math.isfinite(loss) and exact, backend=backend,
                  loss=loss, seconds=dt, peak_gb=_peak_gb(device), tensors=len(full))  # fmt: skip
    finally:
        dist.destroy_process_group()
    del model, sharded
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # LoRA step of the dense target (Qwen2.5-1.5B's shape), loaded the way the finetune stage loads it
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**shapes.target, tie_word_embeddings=True, max_position_embeddings=4096, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        target = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    for p in target.parameters():
        p.requires_grad_(False)
    lora = LoraConfig(
        r=16, lora_alpha=64, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], bias="none"
    )
    target = get_peft_model(target, lora)
    for p in target.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    n_params = sum(p.numel() for p in target.parameters())
    ids, mask, labels = random_batch(shapes.train_batch, shapes.train_len, cfg.vocab_size, device, 3)
    trainable = [p for p in target.parameters() if p.requires_grad]
    _reset_peak(device)
    t0 = time.perf_counter()
    loss = _step(target, trainable, ids, mask, labels, device)
    _sync(device)
    dt = time.perf_counter() - t0
    rep.check("training", "lora_step_target", math.isfinite(loss), params_b=n_params / 1e9, loss=loss,
              seconds=dt, tokens_per_s=int(mask.sum()) / dt, peak_gb=_peak_gb(device))  # fmt: skip
    del target


def section_sweep(rep: Report, device: torch.device, shapes: Shapes, state: dict) -> None:
    from selectmoe.cluster.kmeans import as_unit_rows, spherical_kmeans
    from selectmoe.cluster.silhouette import cosine_silhouette
    from selectmoe.config import SelectConfig

    sel = SelectConfig(router_dir="-", pool_dir="-", output_dir="-")
    k_lo, k_hi = sel.k_range
    n, d = shapes.sweep_rows, shapes.sweep_dim
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(64, d)).astype(np.float32)
    X = np.empty((n, d), dtype=np.float16)  # router features arrive as fp16
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        X[s : s + m] = centres[rng.integers(0, 64, m)] + 0.5 * rng.normal(size=(m, d)).astype(np.float32)
    t0 = time.perf_counter()
    Xt = as_unit_rows(X, device=device)  # once: every k reuses it
    _sync(device)
    upload = time.perf_counter() - t0
    del X
    times = {}
    for k in (k_lo, k_hi):
        _reset_peak(device)
        t0 = time.perf_counter()
        res = spherical_kmeans(Xt, k, n_init=sel.n_init, max_iter=sel.max_iter, tol=sel.tol, seed=sel.seed,
                               device=device)  # fmt: skip
        t_fit = time.perf_counter() - t0
        sil = cosine_silhouette(Xt, res.labels, device=device)
        _sync(device)
        times[k] = time.perf_counter() - t0
        rep.check("sweep", f"kmeans_k{k}", math.isfinite(sil), rows=n, dim=d, fit_s=t_fit,
                  total_s=times[k], n_iter=res.n_iter, silhouette=sil, peak_gb=_peak_gb(device))  # fmt: skip
    # the default sweep fits every k in k_range: time(k) interpolated linearly between the two ends
    slope = (times[k_hi] - times[k_lo]) / max(1, k_hi - k_lo)
    projected = sum(times[k_lo] + slope * (k - k_lo) for k in range(k_lo, k_hi + 1))
    rep.check("sweep", "default_sweep_projection", projected < 3600, k_range=[k_lo, k_hi],
              projected_min=projected / 60, upload_s=upload, actors=1)  # fmt: skip


def section_pipeline(rep: Report, device: torch.device, shapes: Shapes, state: dict) -> None:
    import ray

    from selectmoe.config import load_config
    from selectmoe.pipeline import run_pipeline

    out = Path(tempfile.mkdtemp(prefix="gpu-check-pipeline-"))
    overrides = [
        f"output_dir={out}", "demo.n_clean=160", "demo.pretrain_steps=20", "warmup.max_steps=4",
        "warmup.probe_samples=16", "finetune.max_steps=4", "select.k_range=[4,6]", "select.n_init=1",
    ]  # fmt: skip
    cfg = load_config(ROOT / "selectmoe" / "configs" / "demo.yaml", overrides)
    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    gpus = ray.cluster_resources().get("GPU", 0)
    t0 = time.perf_counter()
    outcomes = run_pipeline(cfg, echo=lambda s: print(s, flush=True))
    ran = [o.stage for o in outcomes if o.status == "ran"]
    ok = (gpus > 0 or device.type == "cpu") and "evaluate" in ran
    rep.check("pipeline", "tiny_pipeline_on_ray", ok, gpus=gpus, stages=ran, seconds=time.perf_counter() - t0)
    ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="tiny shapes on CPU (the test suite's mode)")
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--pipeline", action="store_true", help="with --cpu: run the pipeline section too")
    args = ap.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu for the tiny CPU mode", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu else "cuda")
    shapes = CPU_SHAPES if args.cpu else GPU_SHAPES
    sections = [s for s in args.sections.split(",") if s]
    if args.cpu and not args.pipeline:
        sections = [s for s in sections if s != "pipeline"]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    rep = Report(Path(args.out), str(torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"))
    state: dict[str, Any] = {}
    failed = 0
    t_all = time.perf_counter()
    for name in sections:
        fn = globals()[f"section_{name}"]
        t0 = time.perf_counter()
        try:
            fn(rep, device, shapes, state)
        except Exception as err:  # a failed section is reported; the next one still runs
            traceback.print_exc()
            rep.check(name, f"{name}_section", False, error=f"{type(err).__name__}: {err}"[:300])
        rep.results.setdefault(name, {})["_seconds"] = round(time.perf_counter() - t0, 2)
        rep.write()
    failed = sum(
        1 for sec in rep.results.values() for c in sec.values() if isinstance(c, dict) and not c["pass"]
    )
    print(
        f"gpu_check: {failed} failed, {time.perf_counter() - t_all:.1f}s, figures in {args.out}", flush=True
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
