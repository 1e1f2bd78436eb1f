"""Mixed precision that keeps the small decision-making modules (quality gates, routers) in fp32.

A bf16 gate rounds ``sigmoid(score)`` to ~3 significant digits, which is the whole per-sample quality signal
the selection ranks by; the gates and routers are a few thousand parameters, so fp32 costs nothing. The
modules are named by the model class's ``_keep_in_fp32_modules`` (HF's own list, which transformers 5
applies only when loading in fp16, and never on ``model.to(dtype)``).
"""

from __future__ import annotations

import re

import torch


def fp32_module_patterns(model: torch.nn.Module) -> list[str]:
    """The ``_keep_in_fp32_modules`` of every HF model inside ``model`` (peft wrappers included)."""
    patterns: list[str] = []
    for module in model.modules():
        for name in getattr(module, "_keep_in_fp32_modules", None) or []:
            if name not in patterns:
                patterns.append(name)
    return patterns


def fp32_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The modules matching the model's fp32 list, by name. A pattern matches whole dotted name segments,
    as in transformers (``mlp.gate`` is the router, not the experts' ``gate_up_proj``), and ends the name:
    only the modules themselves, not what is inside them (a LoRA router's ``parametrizations`` ModuleDict,
    which FSDP's ``fully_shard`` refuses, travels with its router)."""
    regexes = [re.compile(rf"(^|\.){re.escape(p)}$") for p in fp32_module_patterns(model)]
    return {n: m for n, m in model.named_modules() if n and any(r.search(n) for r in regexes)}


def cast_model(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``model.to(dtype)`` with the fp32 modules kept fp32.

    The fp32 modules (and everything inside them, LoRA parametrizations included) are never cast to
    ``dtype``: a round trip through bf16 would round the gate weights (by up to 4e-3), which are the signal.
    """
    if dtype == torch.float32:
        return model.to(dtype=dtype)
    keep = fp32_modules(model)
    inside = {id(sub) for module in keep.values() for sub in module.modules()}

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if t.is_floating_point() else t

    for module in model.modules():
        if id(module) not in inside:
            module._apply(cast, recurse=False)
    for module in keep.values():
        module.to(torch.float32)
    return model
