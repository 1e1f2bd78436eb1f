"""Select-MoE modeling: gate init, masks (eager == sdpa), trash modes, router outputs, LB loss, Auto round trip."""

from __future__ import annotations

import pytest
import torch

import selectmoe.model  # noqa: F401  (registers the Select-MoE Auto classes)
from selectmoe.model import (
    SelectMoeConfig,
    SelectMoeForCausalLM,
    register_trash_expert,
    router_sample_stats,
    token_mask_for_scope,
)
from selectmoe.model.modeling_select_moe import SelectMoeTrashExpert
from selectmoe.model.tiny import TINY_MOE, build_tiny_select_moe, train_bpe_tokenizer


@pytest.fixture(scope="module")
def tok():
    texts = [f"sample {i} the quick brown fox jumps over the lazy dog {i % 7}" for i in range(300)]
    return train_bpe_tokenizer(texts, vocab_size=300)


def _padded_batch(vocab: int, pad_id: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = pad_id
    return ids, mask


def test_gate_init_applied_after_post_init():
    from transformers import AutoModelForCausalLM

    cfg = SelectMoeConfig(
        **{**TINY_MOE, "vocab_size": 64},
        quality_gate_init_mean=0.3,
        quality_gate_init_std=0.01,
        quality_gate_init_bias=2.5,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    assert isinstance(model, SelectMoeForCausalLM)
    for layer in model.model.layers:
        assert torch.equal(layer.quality_gate.bias.detach(), torch.tensor([2.5]))
        w = layer.quality_gate.weight.detach()
        assert abs(float(w.mean()) - 0.3) < 0.01
        assert abs(float(w.std()) - 0.01) < 0.004
    # other linears still use initializer_range
    assert (
        abs(float(model.model.layers[0].self_attn.q_proj.weight.detach().std()) - cfg.initializer_range)
        < 0.003
    )


def test_router_outputs_and_losses(tok):
    model = build_tiny_select_moe(tok, seed=0)
    ids, mask = _padded_batch(len(tok), tok.pad_token_id)
    out = model(ids, attention_mask=mask, output_router_logits=True)
    assert out.loss is None and out.aux_loss is None  # LB disabled by default
    assert len(out.router_logits) == TINY_MOE["num_hidden_layers"]
    for r in out.router_logits:
        assert r["quality_score"].shape == (3, 12, 1)
        assert r["moe_logits"].shape == (3 * 12, TINY_MOE["num_experts"])
    # g == sigmoid(4.0) at init for every token (weights are tiny): the converted model is ~function-preserving
    s = out.router_logits[0]["quality_score"]
    assert torch.allclose(
        torch.sigmoid(s), torch.full_like(s, torch.sigmoid(torch.tensor(4.0)).item()), atol=0.05
    )
    assert model(ids, attention_mask=mask).router_logits is None


def test_load_balancing_enabled_and_disabled(tok):
    labels_ids, mask = _padded_batch(len(tok), tok.pad_token_id)
    labels = labels_ids.masked_fill(mask == 0, -100)
    off = build_tiny_select_moe(tok, seed=0)
    on = build_tiny_select_moe(tok, seed=0, enable_load_balancing=True)
    out_off = off(labels_ids, attention_mask=mask, labels=labels)
    out_on = on(labels_ids, attention_mask=mask, labels=labels)
    assert out_off.aux_loss is None
    assert out_on.aux_loss is not None and float(out_on.aux_loss.detach()) > 0.0
    # Switch loss is ~1 for balanced routing (E * sum f_e P_e), never 0
    assert 0.5 < float(out_on.aux_loss.detach()) < float(TINY_MOE["num_experts"])
    c = on.config.router_aux_loss_coef
    w = on.config.quality_loss_weight
    expected = out_on.lm_loss + c * (out_on.aux_loss + w * out_on.quality_loss)
    assert torch.allclose(out_on.loss, expected, atol=1e-6)
    assert torch.allclose(out_off.loss, out_off.lm_loss + c * w * out_off.quality_loss, atol=1e-6)
    # the LB term has a graph into the routers
    on.zero_grad()
    out_on.aux_loss.backward()
    assert float(on.model.layers[0].mlp.gate.weight.grad.abs().sum()) > 0


def test_eager_equals_sdpa_and_auto_round_trip(tok, tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_tiny_select_moe(tok, seed=0).eval()
    model.save_pretrained(tmp_path)
    ids, mask = _padded_batch(len(tok), tok.pad_token_id)
    keep = mask.bool()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, SelectMoeForCausalLM)
        # same weights; only kernel-level float noise (memory layout of loaded tensors) is allowed
        assert float((loaded(ids, attention_mask=mask).logits - ref).abs().max()) <= 1e-6
        eager = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
        sdpa = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
        le = eager(ids, attention_mask=mask).logits
        ls = sdpa(ids, attention_mask=mask).logits
        assert float((le - ls)[keep].abs().max()) <= 1e-5
        # padding is masked: a padded row's real tokens see the same context as the row alone
        alone = eager(ids[2:3, :4], attention_mask=mask[2:3, :4]).logits
        assert float((alone[0] - le[2, :4]).abs().max()) <= 1e-5
        # and attention is causal in eager mode: changing a later token does not change earlier logits
        ids2 = ids.clone()
        ids2[0, 10] = (ids2[0, 10] + 1) % len(tok)
        le2 = eager(ids2, attention_mask=mask).logits
        assert torch.allclose(le2[0, :10], le[0, :10], atol=1e-6)


def _capture_layer(layer, inputs_hidden, model):
    captured = {}

    def hook(_module, args):
        captured["x"] = args[0].detach().clone()

    handle = layer.post_attention_layernorm.register_forward_pre_hook(hook)
    try:
        out = model(inputs_hidden, output_router_logits=True)
    finally:
        handle.remove()
    return captured["x"], out


def test_trash_zero_with_closed_gate_leaves_residual(tok):
    model = build_tiny_select_moe(tok, seed=0).eval()
    layer = model.model.layers[1]
    outputs = {}
    layer.register_forward_hook(lambda m, a, o: outputs.__setitem__("y", o[0].detach().clone()))
    with torch.no_grad():
        layer.quality_gate.bias.fill_(-1e4)  # g == 0 exactly
        ids, _ = _padded_batch(len(tok), tok.pad_token_id)
        x, _ = _capture_layer(layer, ids, model)
    assert torch.equal(outputs["y"], x)  # the MoE output does not change the residual stream


def test_trash_noise_statistics():
    cfg = SelectMoeConfig(**{**TINY_MOE, "vocab_size": 64}, trash_expert_mode="noise")
    trash = SelectMoeTrashExpert(cfg)
    torch.manual_seed(0)
    h = (torch.randn(4, 32, 2048) * torch.rand(4, 32, 1) * 3 + torch.randn(4, 32, 1)).requires_grad_(True)
    y = trash(h)
    assert y.shape == h.shape and not y.requires_grad  # detached
    mu, sd = h.detach().mean(-1), h.detach().std(-1)
    assert float(((y.mean(-1) - mu).abs() / sd).max()) < 5 / 2048**0.5 * 1.5
    assert float((y.std(-1) / sd - 1).abs().max()) < 0.1
    assert not torch.equal(trash(h), y)  # fresh noise each call


def test_trash_custom_is_called(tok):
    calls = []

    def plus_one(h):
        calls.append(tuple(h.shape))
        return torch.ones_like(h)

    register_trash_expert("test_plus_one", plus_one)
    model = build_tiny_select_moe(
        tok, seed=0, trash_expert_mode="custom", trash_expert_name="test_plus_one"
    ).eval()
    layer = model.model.layers[0]
    outputs = {}
    layer.register_forward_hook(lambda m, a, o: outputs.__setitem__("y", o[0].detach().clone()))
    ids, _ = _padded_batch(len(tok), tok.pad_token_id)
    with torch.no_grad():
        layer.quality_gate.bias.fill_(-1e4)  # g == 0: the output is residual + trash
        x, _ = _capture_layer(layer, ids, model)
    assert calls and calls[0] == (3, 12, TINY_MOE["hidden_size"])
    assert torch.allclose(outputs["y"], x + 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="trash_expert_name"):
        build_tiny_select_moe(tok, trash_expert_mode="custom")


def test_token_mask_for_scope():
    am = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, 8]])
    assert token_mask_for_scope(am, labels, "all").tolist() == [[True, True, True, False], [True] * 4]
    assert token_mask_for_scope(am, labels, "trained").tolist() == [
        [False, True, True, False],
        [False, False, True, True],
    ]
    with pytest.raises(ValueError):
        token_mask_for_scope(am, labels, "nope")


def test_router_sample_stats_hand_made():
    # B=2, T=2, L=2, E=2
    s0 = torch.tensor([[[0.0], [2.0]], [[-1.0], [100.0]]])  # layer 0 raw scores
    s1 = torch.tensor([[[1.0], [1.0]], [[0.0], [0.0]]])
    z0 = torch.tensor([[0.0, 0.0], [0.0, 1.0], [2.0, 0.0], [9.0, -9.0]])  # rows b*T + t
    z1 = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    router = ({"quality_score": s0, "moe_logits": z0}, {"quality_score": s1, "moe_logits": z1.bfloat16()})
    mask = torch.tensor([[True, True], [True, False]])  # sample 1's second token is padding
    q, ql, routing = router_sample_stats(router, mask)
    sig = torch.sigmoid
    exp_ql = torch.tensor(
        [
            [(0.5 + float(sig(torch.tensor(2.0)))) / 2, float(sig(torch.tensor(1.0)))],
            [float(sig(torch.tensor(-1.0))), 0.5],
        ]
    )
    assert q.dtype == ql.dtype == routing.dtype == torch.float32
    assert torch.allclose(ql, exp_ql, atol=1e-6)
    assert torch.allclose(q, exp_ql.mean(1), atol=1e-6)
    p01 = torch.softmax(torch.tensor([0.0, 1.0]), 0)
    p20 = torch.softmax(torch.tensor([2.0, 0.0]), 0)
    exp_routing = torch.tensor(
        [
            [*((torch.tensor([0.5, 0.5]) + p01) / 2).tolist(), 0.5, 0.5],
            [*p20.tolist(), 0.5, 0.5],
        ]
    )
    assert routing.shape == (2, 4)
    assert torch.allclose(routing, exp_routing, atol=1e-6)
