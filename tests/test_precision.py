"""The bf16 path on CPU: gates and routers compute in fp32 under autocast, and a bf16 cast leaves them
bit-identical (issue 22, items 1-2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selectmoe.model.tiny import build_tiny_select_moe, train_bpe_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer([f"row {i} of the fox {i % 5}" for i in range(80)], vocab_size=300)


def _ids():
    return torch.randint(3, 290, (2, 9), generator=torch.Generator().manual_seed(0))


def test_gates_and_routers_output_fp32_under_bf16_autocast(tok):
    """Under CPU bf16 autocast (as warmup, the probe and evaluation run on GPU) the quality gates and routers
    output fp32, equal to the fp32 modules applied to the same (bf16-rounded) input outside autocast."""
    model = build_tiny_select_moe(tok, seed=0).eval()
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name):
        def fn(module, args, out):
            seen[name] = (args[0].detach().clone(), (out[0] if isinstance(out, tuple) else out).detach())

        return fn

    layer = model.model.layers[1]
    layer.quality_gate.register_forward_hook(hook("quality_gate"))
    layer.mlp.gate.register_forward_hook(hook("router"))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=_ids(), output_router_logits=True)
    assert {k: v[1].dtype for k, v in seen.items()} == {
        "quality_gate": torch.float32,
        "router": torch.float32,
    }
    assert out.router_logits[1]["quality_score"].dtype == torch.float32
    assert out.router_logits[1]["moe_logits"].dtype == torch.float32
    with torch.no_grad():  # the same input, plain fp32 modules: exactly the autocast outputs
        x, y = seen["quality_gate"]
        assert torch.equal(torch.nn.functional.linear(x.float(), layer.quality_gate.weight,
                                                      layer.quality_gate.bias), y)  # fmt: skip
        x, y = seen["router"]
        assert torch.equal(torch.nn.functional.linear(x.float().reshape(-1, x.shape[-1]),
                                                      layer.mlp.gate.weight), y)  # fmt: skip


def test_cast_model_leaves_fp32_modules_bit_identical(tok):
    """``cast_model(model, bf16)`` never rounds the gates/routers through bf16 (old main: off by ~4e-3)."""
    from selectmoe.model.precision import cast_model, fp32_modules

    model = build_tiny_select_moe(tok, seed=0)
    with torch.no_grad():  # gate weights with many significant bits (the tiny init's are fp32 draws already)
        for layer in model.model.layers:
            layer.quality_gate.weight.add_(1e-3 * torch.randn_like(layer.quality_gate.weight))
    before = {n: t.clone() for n, t in model.state_dict().items()}
    keep = set(fp32_modules(model))
    cast_model(model, torch.bfloat16)
    after = model.state_dict()
    kept = {n for n in after if any(n.startswith(k + ".") for k in keep)}
    assert len(kept) == 4 * 3  # 4 layers: gate weight + bias, router weight
    for n in kept:
        assert after[n].dtype == torch.float32 and torch.equal(after[n], before[n]), n
    for n in set(after) - kept:
        if before[n].is_floating_point():
            assert after[n].dtype == torch.bfloat16 and torch.equal(after[n], before[n].to(torch.bfloat16)), n


def test_cast_model_keeps_lora_parametrized_routers_exact(tok):
    """The LoRA trainable set (a parametrization inside the router) stays fp32 and unchanged too."""
    from selectmoe.model import apply_trainable
    from selectmoe.model.precision import cast_model

    model = apply_trainable(build_tiny_select_moe(tok, seed=0), "lora", lora_r=2, lora_alpha=4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1e-3 * torch.randn_like(p))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    cast_model(model, torch.bfloat16)
    after = dict(model.named_parameters())
    assert any("parametrizations" in n for n in before)
    for n, t in before.items():
        assert after[n].dtype == torch.float32 and torch.equal(after[n], t), n


def test_lora_fsdp_bf16_shards_on_one_rank_gloo(tok, tmp_path):
    """``trainable=lora`` + FSDP2 with the bf16 compute policy on a 1-rank gloo group: the LoRA routers get
    their fp32 unit (old main: ``fully_shard`` refused the ``parametrizations`` ModuleDict), gates and
    routers compute in fp32, and one step changes only the trainable tensors."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from selectmoe.model import apply_trainable
    from selectmoe.training.fsdp import shard_model

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = apply_trainable(build_tiny_select_moe(tok, seed=0), "lora", lora_r=2, lora_alpha=4)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        model = shard_model(model, torch.device("cpu"), bf16=True)
        params = dict(model.named_parameters())
        assert all(isinstance(p, DTensor) for p in params.values())
        out = model(input_ids=_ids(), labels=_ids(), output_router_logits=True)
        assert out.logits.dtype == torch.bfloat16  # the bf16 compute policy ran
        assert out.router_logits[0]["quality_score"].dtype == torch.float32
        assert out.router_logits[0]["moe_logits"].dtype == torch.float32
        out.loss.backward()
        opt = torch.optim.SGD([params[n] for n in trainable], lr=1.0)
        opt.step()
        after = {n: p.detach().full_tensor() for n, p in params.items()}
        changed = {n for n in after if not torch.equal(after[n], before[n])}
        # LoRA B starts at zero, so A gets no gradient on step 1; everything else trainable moves
        assert changed == {n for n in trainable if "lora_A" not in n}
        assert any("lora_B" in n for n in changed) and any("quality_gate" in n for n in changed)
        assert all(after[n].dtype == torch.float32 for n in trainable)
    finally:
        dist.destroy_process_group()


def test_probe_before_the_first_fsdp_step_then_training(tok, tmp_path):
    """The warmup order under FSDP2: the probe's scoring forward runs first (before step 1), then training.
    Old main scored under ``torch.inference_mode``, so FSDP2's lazily allocated buffers became inference
    tensors and step 1 failed ("Inplace update to inference tensor outside InferenceMode"). Scores on the
    sharded model equal the unsharded model's."""
    import torch.distributed as dist

    from selectmoe.model import apply_trainable
    from selectmoe.scoring.model import score_batch
    from selectmoe.training.fsdp import shard_model

    ids = _ids()
    mask = torch.ones_like(ids)
    ref = score_batch(build_tiny_select_moe(tok, seed=0).eval(), ids, mask, ids, scope="all")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = apply_trainable(build_tiny_select_moe(tok, seed=0), "full_rank")
        model = shard_model(model, torch.device("cpu"), bf16=False)
        model.eval()
        got = score_batch(model, ids, mask, ids, scope="all")
        for key in ("quality", "quality_layers", "routing", "sample_nll"):
            np.testing.assert_allclose(got[key], ref[key], rtol=0, atol=1e-6, err_msg=key)
        model.train()
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
    finally:
        dist.destroy_process_group()
