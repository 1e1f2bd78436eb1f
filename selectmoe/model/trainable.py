"""Trainable parameter sets for the warmup: ``full_rank``, ``gates_only``, ``lora`` (routers) — and their
export/import as plain ``SelectMoeForCausalLM`` tensors (LoRA merged).

- ``full_rank``: every ``quality_gate`` weight/bias + every MoE router ``mlp.gate.weight`` (the original's
  set plus the new gate bias: 16·64·2048 + 16·2049 = 2,129,936 on OLMoE-1B-7B).
- ``gates_only``: the quality gates.
- ``lora``: the quality gates fully trainable + a LoRA delta on each router weight, ``W + (alpha/r)·B@A``
  (A [r, d] ~ Kaiming-uniform, B [E, r] = 0). OLMoE's router is a raw ``weight`` parameter
  (``OlmoeTopKRouter``), not an ``nn.Linear``, so the delta is applied with
  ``torch.nn.utils.parametrize`` on that parameter; the stock router code keeps running unchanged.

Everything else is frozen. Trainable parameters are cast to fp32 (use bf16 autocast for a bf16 model).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

TRAINABLE_MODES = ("full_rank", "gates_only", "lora")
_MODE_ATTR = "selectmoe_trainable_mode"


def _unwrap(model):
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _is_gate(name: str) -> bool:
    return "quality_gate" in name


def _is_router(name: str) -> bool:
    return name.endswith("mlp.gate.weight")


class RouterLoRA(nn.Module):
    """Parametrization ``W -> W + scale · B @ A`` for a router weight ``W [E, d]``."""

    def __init__(self, out_features: int, in_features: int, r: int, alpha: float, *, device=None):
        super().__init__()
        self.r = int(r)
        self.scale = float(alpha) / float(r)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=torch.float32))
        if self.lora_A.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta(self) -> torch.Tensor:
        return self.scale * (self.lora_B @ self.lora_A)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta().to(weight.dtype)


def _routers(model) -> list[tuple[str, nn.Module]]:
    from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter

    return [(n, m) for n, m in model.named_modules() if isinstance(m, OlmoeTopKRouter)]


def apply_trainable(
    model,
    mode: str,
    *,
    lora_r: int = 16,
    lora_alpha: float = 64,
    lora_dropout: float = 0.0,
    keep_fp32: bool = True,
):
    """Freeze everything except the ``mode`` set (see module docstring); returns the same model."""
    if mode not in TRAINABLE_MODES:
        raise ValueError(f"trainable mode must be one of {TRAINABLE_MODES}, got {mode!r}")
    if lora_dropout:
        raise ValueError(
            "lora_dropout > 0 is not supported for router LoRA (a weight parametrization, not an input)"
        )
    base = _unwrap(model)
    for p in base.parameters():
        p.requires_grad_(False)
    for name, p in base.named_parameters():
        if _is_gate(name) or (mode == "full_rank" and _is_router(name)):
            if keep_fp32 and p.dtype != torch.float32:
                p.data = p.data.float()
            p.requires_grad_(True)
    if mode == "lora":
        for _, router in _routers(base):
            if parametrize.is_parametrized(router, "weight"):
                continue
            w = router.weight
            lora = RouterLoRA(w.shape[0], w.shape[1], lora_r, lora_alpha, device=w.device)
            parametrize.register_parametrization(router, "weight", lora)
            router.parametrizations.weight.original.requires_grad_(False)
    setattr(base, _MODE_ATTR, mode)
    return model


def trainable_mode(model) -> str:
    """The mode set by :func:`apply_trainable` (``full_rank`` for a model it never touched)."""
    return getattr(_unwrap(model), _MODE_ATTR, "full_rank")


@torch.no_grad()
def export_trainable(model) -> dict[str, torch.Tensor]:
    """Trainable tensors under plain ``SelectMoeForCausalLM`` names (detached, contiguous clones): gates and,
    unless ``gates_only``, router weights — LoRA merged (``W + scale·B@A``, i.e. the effective weight)."""
    base = _unwrap(model)
    mode = trainable_mode(base)
    out: dict[str, torch.Tensor] = {}
    for name, p in base.named_parameters():
        if _is_gate(name):
            out[name] = p.detach().clone().contiguous()
    if mode != "gates_only":
        for name, router in _routers(base):
            out[f"{name}.weight"] = router.weight.detach().clone().contiguous()  # effective (merged) weight
    return out


@torch.no_grad()
def import_trainable(model, tensors: dict[str, torch.Tensor], *, strict: bool = True) -> list[str]:
    """Copy ``tensors`` (names as :func:`export_trainable` writes them) into ``model``. A LoRA-parametrized
    router gets the merged weight as its base and a zero delta. Raises ``ValueError`` naming the tensor on an
    unknown name or a shape mismatch (``strict``)."""
    base = _unwrap(model)
    params = dict(base.named_parameters())
    routers = dict(_routers(base))
    loaded = []
    for name, value in tensors.items():
        if name.endswith(".weight") and name[: -len(".weight")] in routers:
            router = routers[name[: -len(".weight")]]
            if parametrize.is_parametrized(router, "weight"):
                target = router.parametrizations.weight.original
                for p in router.parametrizations.weight:
                    if isinstance(p, RouterLoRA):
                        p.lora_B.zero_()
            else:
                target = router.weight
        elif name in params:
            target = params[name]
        else:
            if strict:
                raise ValueError(f"trainable tensor {name!r} has no counterpart in {type(base).__name__}")
            continue
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(
                f"trainable tensor {name!r}: checkpoint shape {tuple(value.shape)} does not match the model's "
                f"{tuple(target.shape)} (a checkpoint from another base model?)"
            )
        target.copy_(value.to(device=target.device, dtype=target.dtype))
        loaded.append(name)
    return loaded


def count_trainable(config, mode: str, *, lora_r: int = 16, lora_alpha: float = 64) -> int:
    """Number of trainable parameters of ``mode`` for ``config``, computed on the meta device (no memory)."""
    from selectmoe.model.modeling_select_moe import SelectMoeForCausalLM

    with torch.device("meta"):
        model = SelectMoeForCausalLM(config)
        apply_trainable(model, mode, lora_r=lora_r, lora_alpha=lora_alpha, keep_fp32=False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = [
    "TRAINABLE_MODES",
    "RouterLoRA",
    "apply_trainable",
    "count_trainable",
    "export_trainable",
    "import_trainable",
    "trainable_mode",
]
