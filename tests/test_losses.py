"""Quality losses (graph kept for every type), sample/token averaging, exact gradient accumulation."""

from __future__ import annotations

import logging

import pytest
import torch

import selectmoe.model  # noqa: F401  (registers the Select-MoE Auto classes)
from selectmoe.model import apply_trainable, register_quality_loss
from selectmoe.model.losses import quality_loss
from selectmoe.model.tiny import build_tiny_select_moe, train_bpe_tokenizer
from selectmoe.training.loop import global_counts

LOSS_TYPES = ["sigmoid", "mse", "beta_moment_matching", "mean_variance_regularization", "custom"]


@pytest.fixture(scope="module")
def tok():
    texts = [f"row {i} a small corpus for a byte level tokenizer {i % 5}" for i in range(300)]
    return train_bpe_tokenizer(texts, vocab_size=300)


def _batch(vocab: int, pad_id: int, n: int = 8, width: int = 10, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (n, width), generator=gen)
    lengths = torch.randint(3, width + 1, (n,), generator=gen)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    ids[mask == 0] = pad_id
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # a "prompt" that is not trained
    return ids, mask, labels


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_has_gate_gradient(tok, loss_type):
    register_quality_loss("custom", lambda g, mask, params: (g - 0.25).abs())
    # bias 0 keeps g near 0.5 where the moment losses are not at their optimum
    model = build_tiny_select_moe(tok, seed=0, quality_loss_type=loss_type, quality_gate_init_bias=0.0)
    ids, mask, labels = _batch(len(tok), tok.pad_token_id)
    out = model(ids, attention_mask=mask, labels=labels)
    assert out.quality_loss.requires_grad
    out.quality_loss.backward()
    for layer in model.model.layers:
        assert float(layer.quality_gate.weight.grad.abs().sum()) > 0
        assert float(layer.quality_gate.bias.grad.abs()) > 0


def test_quality_loss_values_by_hand():
    s = torch.tensor([[[0.0], [0.0], [2.0]], [[-2.0], [5.0], [5.0]]])  # [B=2, T=3, 1]
    mask = torch.tensor([[True, True, False], [True, False, False]])
    g = torch.sigmoid(s.squeeze(-1))
    sample = quality_loss([s], mask, loss_type="sigmoid", sample_wise=True)
    assert torch.allclose(sample, ((g[0, 0] + g[0, 1]) / 2 + g[1, 0]) / 2)
    token = quality_loss([s], mask, loss_type="sigmoid", sample_wise=False)
    assert torch.allclose(token, (g[0, 0] + g[0, 1] + g[1, 0]) / 3)
    mse = quality_loss([s, s], mask, loss_type="mse", sample_wise=False)
    assert torch.allclose(mse, (g[0, 0] ** 2 + g[0, 1] ** 2 + g[1, 0] ** 2) / 3)
    vals = torch.stack([g[0, 0], g[0, 1], g[1, 0]])
    m, v = vals.mean(), vals.var()
    params = {"target_mean": 0.4, "target_var": 0.01, "w_mean": 2.0, "w_var": 3.0}
    beta = quality_loss([s], mask, loss_type="beta_moment_matching", params=params)
    assert torch.allclose(beta, 2.0 * (m - 0.4) ** 2 + 3.0 * (v - 0.01) ** 2)
    mvr = quality_loss([s], mask, loss_type="mean_variance_regularization", params={"lambda_var": 0.2})
    assert torch.allclose(mvr, (m - 0.5) ** 2 - 0.2 * v)
    # global counts: the micro-batch's sum is divided by the step's count
    assert torch.allclose(quality_loss([s], mask, sample_wise=True, num_samples_in_batch=4), sample * 2 / 4)
    with pytest.raises(ValueError, match="unknown quality loss"):
        quality_loss([s], mask, loss_type="nope")


def _counts(batches, scope):
    """The step's global counts, as the loop passes them to every micro-batch forward."""
    counts = global_counts(batches, scope)
    return {
        k: counts[k] for k in ("num_items_in_batch", "num_samples_in_batch", "num_quality_tokens_in_batch")
    }


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("sample_wise,scope", [(True, "all"), (False, "trained")])
def test_gradient_accumulation_is_exact(tok, sample_wise, scope):
    kw = dict(sample_wise_averaging=sample_wise, quality_token_scope=scope, quality_gate_init_bias=0.5)
    ids, mask, labels = _batch(len(tok), tok.pad_token_id)
    full = build_tiny_select_moe(tok, seed=0, **kw)
    apply_trainable(full, "full_rank")
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    counts = _counts([batch], scope)
    full(**batch, **counts).loss.backward()
    ref = _grads(full)

    ga = build_tiny_select_moe(tok, seed=0, **kw)
    apply_trainable(ga, "full_rank")
    micro = [{k: v[i : i + 2] for k, v in batch.items()} for i in range(0, 8, 2)]
    counts = _counts(micro, scope)
    for mb in micro:
        ga(**mb, **counts).loss.backward()
    got = _grads(ga)
    assert ref.keys() == got.keys() and len(ref) == 3 * 4  # router, gate weight, gate bias per layer
    for name in ref:
        assert float(ref[name].abs().max()) > 0
        assert torch.allclose(got[name], ref[name], atol=1e-5, rtol=0), name


def test_quality_loss_debug_logs(tok, caplog):
    model = build_tiny_select_moe(tok, seed=0, quality_loss_debug=True)
    ids, mask, labels = _batch(len(tok), tok.pad_token_id, n=2)
    with caplog.at_level(logging.INFO, logger="selectmoe.model.losses"):
        model(ids, attention_mask=mask, labels=labels)
    text = caplog.text
    assert "quality_loss layer=0" in text and "layer=3" in text and "g_mean=" in text
    assert "quality_loss total=" in text
