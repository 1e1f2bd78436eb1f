"""THE scoring function's pieces (issue 22, item 6): vectorised per-row NLL equal to the per-row loop, no KV
cache, the IFD answer pass sorted by length in groups (order restored)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from selectmoe.data.encoding import IGNORE_INDEX
from selectmoe.scoring.model import answer_only_nll, length_groups, mean_token_nll, score_batch


def _loop_nll(logits, targets) -> np.ndarray:
    """The per-row loop this replaced (the reference): one fp32 cross-entropy per row."""
    out = np.full(logits.shape[0], np.nan, dtype=np.float32)
    shifted = targets[:, 1:]
    for i in range(logits.shape[0]):
        keep = shifted[i] != IGNORE_INDEX
        if bool(keep.any()):
            row = logits[i, :-1][keep].to(torch.float32)
            out[i] = float(F.cross_entropy(row, shifted[i][keep], reduction="mean"))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vectorised_nll_equals_the_row_loop(dtype, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(7, 33, 101, generator=gen)).to(dtype)
    targets = torch.randint(0, 101, (7, 33), generator=gen)
    targets[1, 20:] = IGNORE_INDEX  # right padding
    targets[2, :] = IGNORE_INDEX  # nothing to score: NaN
    targets[3, 1:10] = IGNORE_INDEX  # masked question
    ref = _loop_nll(logits, targets)
    import selectmoe.scoring.model as sm

    for chunk in (1 << 27, 33 * 101 * 2):  # one chunk, and chunks of 2 rows
        monkeypatch.setattr(sm, "NLL_CHUNK_ELEMENTS", chunk)
        got = mean_token_nll(logits, targets)
        assert got.dtype == np.float32 and np.isnan(got[2]) and np.isnan(ref[2])
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=0)  # within 1e-6 relative: 1-2 fp32 ulps at ~9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_log_softmax_for_two_target_sets_is_the_cross_entropy_of_each(dtype, monkeypatch):
    """The score stage's sample and answer NLLs share one log-softmax: each equals, bit for bit, a flat
    ``F.cross_entropy`` over the shifted logits with its own targets (what the scores were before)."""
    import torch.nn.functional as F

    import selectmoe.scoring.model as sm

    gen = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(5, 21, 301, generator=gen)).to(dtype)
    whole = torch.randint(0, 301, (5, 21), generator=gen)
    whole[4, 15:] = IGNORE_INDEX
    answer = whole.clone()
    answer[:, :12] = IGNORE_INDEX
    answer[3] = IGNORE_INDEX

    def flat(targets):
        shifted = targets[:, 1:]
        keep = shifted != IGNORE_INDEX
        nll = F.cross_entropy(
            logits[:, :-1].to(torch.float32).reshape(-1, 301),
            shifted.masked_fill(~keep, 0).reshape(-1),
            reduction="none",
        )
        total = (nll.view(5, 20) * keep).sum(dim=1)
        count = keep.sum(dim=1)
        return torch.where(
            count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan"))
        ).numpy()

    for chunk in (1 << 27, 21 * 301 * 2):
        monkeypatch.setattr(sm, "NLL_CHUNK_ELEMENTS", chunk)
        got_whole, got_answer = sm.mean_token_nlls(logits, [whole, answer])
        np.testing.assert_array_equal(got_whole, flat(whole))
        np.testing.assert_array_equal(got_answer, flat(answer))  # NaN for row 3 in both
        assert np.isnan(got_answer[3])


def test_length_groups_sort_and_cut():
    lengths = [30, 5, 31, 6, 100, 5, 7, 29]
    groups = length_groups(lengths, min_rows=2, max_ratio=1.25)
    assert [g.tolist() for g in groups] == [[1, 5, 3], [6, 7], [0, 2], [4]]
    assert sorted(np.concatenate(groups).tolist()) == list(range(8))


@pytest.fixture(scope="module")
def tiny():
    from selectmoe.model.tiny import build_tiny_select_moe, train_bpe_tokenizer

    tok = train_bpe_tokenizer([f"row {i} of the fox {i % 5}" for i in range(80)], vocab_size=300)
    return build_tiny_select_moe(tok, seed=0).eval()


def _batch(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, 290, (len(lengths), width), generator=gen)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids[mask == 0] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :2] = IGNORE_INDEX
    return ids, mask, labels


def test_scoring_runs_without_a_kv_cache(tiny):
    caches = []
    handle = tiny.model.register_forward_hook(lambda m, a, out: caches.append(out.cache))
    try:
        ids, mask, labels = _batch([9, 5, 12])
        score_batch(tiny, ids, mask, labels, scope="all", response_labels=labels)
        answer_only_nll(tiny, ids, mask, labels)
    finally:
        handle.remove()
    assert len(caches) >= 2 and all(c is None for c in caches)


def test_answer_pass_runs_sorted_groups_and_restores_order(tiny, monkeypatch):
    """20 rows of mixed lengths: the forwards see length-sorted groups trimmed to their longest row, and each
    row's NLL equals the row scored alone (in input order)."""
    import selectmoe.scoring.model as sm

    lengths = [40, 6, 7, 38, 5, 39, 8, 6, 41, 7, 5, 40, 6, 8, 39, 5, 7, 38, 6, 41]
    ids, mask, labels = _batch(lengths, seed=1)
    widths = []
    handle = tiny.model.register_forward_hook(
        lambda m, a, out: widths.append(out.last_hidden_state.shape[:2])
    )
    try:
        got = answer_only_nll(tiny, ids, mask, labels)
    finally:
        handle.remove()
    groups = sm.length_groups(lengths)
    assert [tuple(w) for w in widths] == [(len(g), max(lengths[k] for k in g)) for g in groups]
    assert [tuple(w) for w in widths] == [(8, 7), (8, 39), (4, 41)]  # 8 short answers pad to 7, not 41
    alone = np.array([
        mean_token_nll(tiny(input_ids=ids[i : i + 1, :n], attention_mask=mask[i : i + 1, :n]).logits.detach(),
                       labels[i : i + 1, :n])[0]
        for i, n in enumerate(lengths)
    ])  # fmt: skip
    np.testing.assert_allclose(got, alone, rtol=0, atol=2e-5)
