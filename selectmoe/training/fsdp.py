"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the shared loop: one unit per decoder layer, then
the root, with a mixed-precision policy instead of a bf16 cast.

Why not Ray Train's ``prepare_model(parallel_strategy="fsdp")``: it wraps the whole model as one FSDP1
flat unit (which shards nothing useful, and refuses a bf16 model with fp32 trainable tensors: "Must
flatten tensors with uniform dtype"), and it refuses CPU workers. FSDP2 shards each parameter on its own
(frozen and trainable may share a unit), keeps fp32 shards and computes in bf16 through its policy, and
runs over gloo on CPU, so the same code path is tested on CPU workers.
"""

from __future__ import annotations

import torch

from selectmoe.model.precision import fp32_modules


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's transformer blocks: modules whose class is in an HF model's ``_no_split_modules``."""
    classes: set[str] = set()
    for module in model.modules():
        classes.update(getattr(module, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in classes]


def shard_model(model: torch.nn.Module, device: torch.device, *, bf16: bool) -> torch.nn.Module:
    """Shard ``model`` (built on every rank's host: fp32, or bf16 frozen weights with fp32 trainable ones on a
    bf16 run) over the default process group, in place.

    Each unit is moved to ``device`` as it is sharded (FSDP2 moves what it manages), so a GPU never holds the
    whole model; shards keep the dtype they were loaded in. ``bf16``: compute in bf16 with fp32 gradient
    reduction; the model's fp32 modules (quality gates, routers) get their own unit that computes in fp32.
    The trainable parameters become DTensors: read them whole with ``.full_tensor()`` (every rank must
    call it)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    layers = decoder_layers(model)
    if not layers:
        raise ValueError(
            f"strategy=fsdp needs a model with decoder layers (HF _no_split_modules); {type(model).__name__} "
            "has none: use strategy=ddp"
        )
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))  # FSDP2 moves each unit onto it
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy()
    )
    if bf16:
        fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        for module in fp32_modules(model).values():
            if any(True for _ in module.parameters()):
                fully_shard(module, mp_policy=fp32, mesh=mesh)
    for layer in layers:
        fully_shard(layer, mp_policy=policy, mesh=mesh)
    fully_shard(model, mp_policy=policy, mesh=mesh)
    return model
