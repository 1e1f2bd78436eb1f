"""OLMoE → Select-MoE conversion: copy every tensor, initialise the quality gates, verify logits."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

VERIFY_OPEN_BIAS = 1.0e4  # sigmoid(1e4) == 1.0 exactly in fp32, so g == 1 and (1 - g) == 0
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class ConvertResult:
    source: str
    output_dir: str
    n_tensors_copied: int
    n_params: int
    n_quality_gate_params: int
    num_layers: int
    num_experts: int
    tokenizer_saved: bool
    verified: bool
    max_abs_diff: float | None
    atol: float
    wall_s: float
    gate_init: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return json.dumps(self.summary(), indent=2, sort_keys=True)


def _check_source(src: Path) -> dict[str, Any]:
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"convert: {src} is not a Hugging Face model directory (no config.json)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("model_type") != "olmoe":
        raise ValueError(
            f"convert: source {src} has model_type {cfg.get('model_type')!r}; only 'olmoe' checkpoints can be "
            "converted to Select-MoE"
        )
    return cfg


def _verify_batch(vocab_size: int, pad_id: int | None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (3, 16), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0  # right padding
    mask[2, 5:] = 0
    if pad_id is not None:
        ids[mask == 0] = pad_id
    return ids, mask


@torch.no_grad()
def verify_logits(olmoe, select_moe, *, atol: float = 1e-5) -> float:
    """With every quality gate forced open (bias → +1e4, so g == 1), Select-MoE must reproduce OLMoE's logits
    on a right-padded batch (non-pad positions). Returns the max-abs-diff; raises when it exceeds ``atol``."""
    layers = select_moe.model.layers
    saved = [layer.quality_gate.bias.detach().clone() for layer in layers]
    was_training = (olmoe.training, select_moe.training)
    olmoe.eval()
    select_moe.eval()
    try:
        for layer in layers:
            layer.quality_gate.bias.fill_(VERIFY_OPEN_BIAS)
        ids, mask = _verify_batch(olmoe.config.vocab_size, olmoe.config.pad_token_id)
        ref = olmoe(input_ids=ids, attention_mask=mask).logits.float()
        out = select_moe(input_ids=ids, attention_mask=mask).logits.float()
        diff = float((ref - out)[mask.bool()].abs().max())
    finally:
        for layer, bias in zip(layers, saved, strict=True):
            layer.quality_gate.bias.copy_(bias)
        olmoe.train(was_training[0])
        select_moe.train(was_training[1])
    if not diff <= atol:
        raise RuntimeError(
            f"convert: logits verification failed: max-abs-diff {diff:.3g} > atol {atol:g} with the gates open"
        )
    return diff


def select_moe_config(
    olmoe_config,
    *,
    gate_init_mean: float = 0.0,
    gate_init_std: float = 0.02,
    gate_init_bias: float = 4.0,
    trash_expert_mode: str = "zero",
    **config_extras,
):
    """The ``SelectMoeConfig`` of an OLMoE config: every OLMoE setting plus the gate init and extras."""
    from selectmoe.model.configuration_select_moe import SelectMoeConfig

    base = olmoe_config.to_dict()
    for key in (
        "model_type",
        "architectures",
        "transformers_version",
        "_name_or_path",
        "dtype",
        "torch_dtype",
    ):
        base.pop(key, None)
    base["_attn_implementation"] = olmoe_config._attn_implementation
    return SelectMoeConfig(
        **base,
        quality_gate_init_mean=float(gate_init_mean),
        quality_gate_init_std=float(gate_init_std),
        quality_gate_init_bias=float(gate_init_bias),
        trash_expert_mode=trash_expert_mode,
        **config_extras,
    )


def fresh_quality_gates(config, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """The quality-gate tensors exactly as a seeded ``SelectMoeForCausalLM(config)`` initialises them.

    The model is built whole because the gates' values depend on the seeded init stream of everything
    before them; it is freed on return, before the source is loaded, so convert never holds two copies."""
    from selectmoe.model.modeling_select_moe import SelectMoeForCausalLM

    torch.manual_seed(seed)
    model = SelectMoeForCausalLM(config).float()
    return {n: t.detach().clone() for n, t in model.state_dict().items() if "quality_gate" in n}


def attach_olmoe(config, olmoe, gates: dict[str, torch.Tensor], *, share: bool = True):
    """A ``SelectMoeForCausalLM`` built on the meta device that takes OLMoE's fp32 tensors plus ``gates``.

    ``share``: the tensors are OLMoE's own (one copy of the weights in memory; what convert does), else
    copies. Returns ``(model, n_tensors_taken)``."""
    from selectmoe.model.modeling_select_moe import SelectMoeForCausalLM

    with torch.device("meta"):
        model = SelectMoeForCausalLM(config)
    src = olmoe.state_dict()
    dst = model.state_dict()
    missing = sorted(k for k in dst if k not in src and "quality_gate" not in k)
    unexpected = sorted(k for k in src if k not in dst)
    mismatched = sorted(
        f"{k}: source {tuple(src[k].shape)} vs Select-MoE {tuple(dst[k].shape)}"
        for k in src
        if k in dst and src[k].shape != dst[k].shape
    )
    if missing or unexpected or mismatched:
        raise ValueError(
            "convert: OLMoE tensors do not match the Select-MoE layout: "
            f"missing={missing[:8]} unexpected={unexpected[:8]} mismatched={mismatched[:8]}"
        )
    tensors = {k: v.to(torch.float32, copy=not share) for k, v in src.items()}
    model.load_state_dict({**tensors, **gates}, strict=True, assign=True)
    buffers = dict(olmoe.named_buffers())  # non-persistent ones too (rotary inv_freq)
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner).register_buffer(leaf, buffers[name].clone(), persistent=False)
    model.train(olmoe.training)
    return model, len(src)


def build_select_moe_from_olmoe(
    olmoe,
    *,
    gate_init_mean: float = 0.0,
    gate_init_std: float = 0.02,
    gate_init_bias: float = 4.0,
    trash_expert_mode: str = "zero",
    seed: int = 0,
    **config_extras,
):
    """A fp32 ``SelectMoeForCausalLM`` with OLMoE's config, every OLMoE tensor copied and fresh gates."""
    config = select_moe_config(
        olmoe.config,
        gate_init_mean=gate_init_mean,
        gate_init_std=gate_init_std,
        gate_init_bias=gate_init_bias,
        trash_expert_mode=trash_expert_mode,
        **config_extras,
    )
    return attach_olmoe(config, olmoe, fresh_quality_gates(config, seed=seed), share=False)


def convert_olmoe(
    src_dir,
    dst_dir,
    *,
    gate_init_mean: float = 0.0,
    gate_init_std: float = 0.02,
    gate_init_bias: float = 4.0,
    trash_expert_mode: str = "zero",
    verify: bool = True,
    atol: float = 1e-5,
) -> ConvertResult:
    """Convert an OLMoE checkpoint dir into a Select-MoE dir (safetensors + config + tokenizer + manifest).

    Refuses (``ValueError``) a source whose ``model_type`` is not ``olmoe`` or whose tensors do not match;
    with ``verify`` raises ``RuntimeError`` unless the gates-open logits equal OLMoE's within ``atol``
    (nothing is written in that case).
    """
    from transformers import AutoConfig, OlmoeForCausalLM

    from selectmoe.manifest import write_manifest

    t0 = time.perf_counter()
    src, dst = Path(src_dir), Path(dst_dir)
    _check_source(src)
    try:
        olmoe_config = AutoConfig.from_pretrained(src, attn_implementation="eager")
        config = select_moe_config(
            olmoe_config,
            gate_init_mean=gate_init_mean,
            gate_init_std=gate_init_std,
            gate_init_bias=gate_init_bias,
            trash_expert_mode=trash_expert_mode,
        )
        gates = fresh_quality_gates(config)  # before the source loads: never two fp32 copies at once
        olmoe, info = OlmoeForCausalLM.from_pretrained(
            src, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
        )
    except (RuntimeError, ValueError, KeyError, OSError) as err:
        raise ValueError(
            f"convert: cannot load {src} as OLMoE (tensors do not match its config?): {err}"
        ) from err
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise ValueError(f"convert: the tensors in {src} do not match its OLMoE config: {bad}")
    model, n_copied = attach_olmoe(config, olmoe, gates)
    diff = verify_logits(olmoe, model, atol=atol) if verify else None

    dst.mkdir(parents=True, exist_ok=True)
    model.config._attn_implementation = None  # let the loader pick (sdpa where available)
    model.save_pretrained(dst)
    tokenizer_saved = False
    if any((src / f).is_file() for f in _TOKENIZER_FILES):
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(src).save_pretrained(dst)
        tokenizer_saved = True
    n_gate = sum(p.numel() for n, p in model.named_parameters() if "quality_gate" in n)
    result = ConvertResult(
        source=str(src),
        output_dir=str(dst),
        n_tensors_copied=n_copied,
        n_params=sum(p.numel() for p in model.parameters()),
        n_quality_gate_params=n_gate,
        num_layers=model.config.num_hidden_layers,
        num_experts=model.config.num_experts,
        tokenizer_saved=tokenizer_saved,
        verified=diff is not None,
        max_abs_diff=diff,
        atol=float(atol),
        wall_s=0.0,
        gate_init={"mean": float(gate_init_mean), "std": float(gate_init_std), "bias": float(gate_init_bias)},
    )
    result.wall_s = round(time.perf_counter() - t0, 3)
    write_manifest(
        dst,
        stage="convert",
        config={
            "gate_init_mean": gate_init_mean,
            "gate_init_std": gate_init_std,
            "gate_init_bias": gate_init_bias,
            "trash_expert_mode": trash_expert_mode,
            "verify": verify,
            "atol": atol,
        },
        inputs={"source": str(src)},
        counts={
            "tensors_copied": n_copied,
            "params": result.n_params,
            "quality_gate_params": n_gate,
            "max_abs_diff": diff,
        },
        seed=0,
        wall_s=result.wall_s,
    )
    return result


__all__ = [
    "VERIFY_OPEN_BIAS",
    "ConvertResult",
    "attach_olmoe",
    "build_select_moe_from_olmoe",
    "convert_olmoe",
    "fresh_quality_gates",
    "select_moe_config",
    "verify_logits",
]
