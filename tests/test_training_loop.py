"""The training loop's step without Ray: exact gradient accumulation, collate, counts, batch arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selectmoe.data.encoding import pad_columns
from selectmoe.training.batching import grad_accum_steps, steps_per_epoch
from selectmoe.training.loop import forward_backward, global_counts


@pytest.fixture(scope="module")
def tiny():
    from selectmoe.model.tiny import build_tiny_select_moe, train_bpe_tokenizer

    texts = [f"sample {i} says {' '.join(str(j * i) for j in range(i % 7 + 2))} done" for i in range(60)]
    tok = train_bpe_tokenizer(texts, vocab_size=300)
    model = build_tiny_select_moe(tok, seed=0)
    return tok, model


def _rows(tok, n, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        L = int(rng.integers(5, 24))
        ids = rng.integers(5, tok.vocab_size if hasattr(tok, "vocab_size") else 300, size=L).astype(np.int32)
        labels = ids.copy()
        labels[: int(rng.integers(0, L // 2 + 1))] = -100  # a masked prompt of varying length
        if i == 1:
            labels[:] = -100  # a sample without any label token
        rows.append((ids, labels))
    return rows


def collate(rows, pad):
    return pad_columns([r[0] for r in rows], [r[1] for r in rows], pad)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("loss_type", "sample_wise", "scope"),
    [("sigmoid", True, "all"), ("mse", False, "trained"), ("sigmoid", True, "trained")],
)
def test_ga_equals_one_big_batch(tiny, loss_type, sample_wise, scope):
    """Per-token losses only: batch-level losses (beta moment matching) are not decomposable over micro-batches."""
    from selectmoe.model import apply_trainable

    tok, model = tiny
    model.config.quality_loss_type = loss_type
    model.config.sample_wise_averaging = sample_wise
    model.config.quality_token_scope = scope
    model.config.quality_loss_weight = 50.0  # make the quality term matter in the gradient
    apply_trainable(model, "full_rank", lora_dropout=0.0)
    model.train()  # no dropout in the tiny config: train mode is deterministic
    pad = tok.pad_token_id
    rows = _rows(tok, 8)
    kw = {
        "count_kwargs": ("num_samples_in_batch", "num_quality_tokens_in_batch"),
        "forward_kwargs": {"output_router_logits": True},
    }

    big = [collate(rows, pad)]
    model.zero_grad(set_to_none=True)
    loss_big = forward_backward(model, big, global_counts(big, scope), **kw)
    g_big = _grads(model)

    micro = [collate(rows[i : i + 2], pad) for i in range(0, 8, 2)]
    model.zero_grad(set_to_none=True)
    loss_ga = forward_backward(model, micro, global_counts(micro, scope), **kw)
    g_ga = _grads(model)

    assert float(loss_ga) == pytest.approx(float(loss_big), rel=1e-5, abs=1e-6)
    assert g_big.keys() == g_ga.keys() and g_big
    for name in g_big:
        torch.testing.assert_close(g_ga[name], g_big[name], rtol=1e-4, atol=1e-6, msg=name)

    # the naive alternative (per-micro-batch means, averaged) differs: the test has teeth
    with torch.no_grad():
        naive = sum(float(model(**mb).loss) for mb in micro) / len(micro)
    assert abs(naive - float(loss_big)) > 1e-4


def test_collate_and_counts(tiny):
    tok, _ = tiny
    rows = _rows(tok, 3)
    mb = collate(rows, tok.pad_token_id)
    assert mb["input_ids"].shape == mb["labels"].shape == mb["attention_mask"].shape
    assert int(mb["attention_mask"].sum()) == sum(len(r[0]) for r in rows)
    assert (mb["labels"][mb["attention_mask"] == 0] == -100).all()
    counts = global_counts([mb], "trained")
    assert int(counts["num_samples_in_batch"]) == 2  # row 1 has no trained token
    assert int(global_counts([mb], "all")["num_samples_in_batch"]) == 3
    assert int(counts["num_items_in_batch"]) == int((mb["labels"][:, 1:] != -100).sum())


def test_batch_arithmetic():
    assert grad_accum_steps(16, 4, 2) == 2
    with pytest.raises(ValueError, match="micro_batch_size in"):
        grad_accum_steps(16, 3, 2)
    assert steps_per_epoch(101, 16, 2) == 6  # 50 rows per worker, 8 per worker per step


def test_deterministic_cpu_gives_bit_identical_gradients(tiny):
    """Two backward passes of the same batch with 2 threads: identical to the bit under ``deterministic_cpu``
    (without it they differed in every layer below the top MoE block when measured), and the mode is
    restored afterwards."""
    from selectmoe.model.tiny import build_tiny_olmoe
    from selectmoe.training.determinism import deterministic_cpu

    tok, _ = tiny
    model = build_tiny_olmoe(tok, seed=0)
    model.train()
    ids = torch.randint(3, 290, (16, 100), generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = []
        with deterministic_cpu():
            assert torch.are_deterministic_algorithms_enabled()
            for _ in range(2):
                model.zero_grad(set_to_none=True)
                model(input_ids=ids, labels=ids).loss.backward()
                runs.append({n: p.grad.clone() for n, p in model.named_parameters()})
    finally:
        torch.set_num_threads(threads)
    assert not torch.are_deterministic_algorithms_enabled()
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
    assert all(float(g.abs().sum()) > 0 for g in runs[0].values())


@pytest.mark.pinned
def test_ga_with_load_balancing_is_per_micro_batch(tiny):
    """Load balancing is a product of two batch means (token share x router probability per expert), so
    it is computed per micro-batch and weighted by the micro-batch's share, as HF and Megatron do: not
    exact under GA. The gap is pinned (as measured; docs/architecture.md) and is what the weighting
    promises: the big-batch step minus the GA step is exactly coef x (aux(big) - sum of share x aux(mb))."""
    from selectmoe.model import apply_trainable

    tok, model = tiny
    model.config.quality_loss_type = "sigmoid"
    model.config.sample_wise_averaging = True
    model.config.quality_token_scope = "all"
    model.config.quality_loss_weight = 1.0
    model.config.enable_load_balancing = True
    try:
        apply_trainable(model, "full_rank", lora_dropout=0.0)
        model.train()
        rows = _rows(tok, 8)
        kw = {
            "count_kwargs": ("num_samples_in_batch", "num_quality_tokens_in_batch"),
            "forward_kwargs": {"output_router_logits": True},
        }
        big = [collate(rows, tok.pad_token_id)]
        micro = [collate(rows[i : i + 2], tok.pad_token_id) for i in range(0, 8, 2)]
        aux = {}

        def record(name):
            return lambda out, mb: aux.setdefault(name, []).append(float(out.aux_loss))

        model.zero_grad(set_to_none=True)
        loss_big = forward_backward(model, big, global_counts(big), on_output=record("big"), **kw)
        model.zero_grad(set_to_none=True)
        loss_ga = forward_backward(model, micro, global_counts(micro), on_output=record("ga"), **kw)
    finally:
        model.config.enable_load_balancing = False
    coef = model.config.router_aux_loss_coef
    gap = float(loss_big) - float(loss_ga)
    assert gap == pytest.approx(coef * (aux["big"][0] - sum(aux["ga"])), abs=1e-6)
    assert abs(gap) > 1e-4  # not exact: the documented per-micro-batch behaviour
    assert gap == pytest.approx(-5.15e-4, abs=1e-5), gap  # measured: -5.150e-4 at coef 0.01 (loss ~5.8)
