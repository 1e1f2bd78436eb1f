"""The quality probe: AUC definition, corrupted twins, the same score as the scoring stage, the CLI."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from selectmoe.scoring.probe import build_probe_set


def _brute_auc(pos, neg):
    pairs = list(itertools.product(pos, neg))
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)


def _gate_auc(pos, neg) -> float:
    """The probe's AUC: sklearn's ROC AUC through ``scorer_aucs`` (gate = the ``quality`` column)."""
    from selectmoe.selection.scorers import scorer_aucs

    quality = np.r_[np.asarray(pos, float), np.asarray(neg, float)]
    kinds = ["clean"] * len(pos) + ["noise"] * len(neg)
    nan = np.full(len(kinds), np.nan)
    columns = {"quality": quality, "response_nll": nan, "sample_nll": nan, "ifd": nan}
    return scorer_aucs(columns, kinds)["gate"]["overall"]


def test_probe_auc_is_the_mann_whitney_statistic_with_ties():
    rng = np.random.default_rng(0)
    pos = rng.integers(0, 5, size=17).astype(float)
    neg = rng.integers(0, 5, size=11).astype(float)
    assert _gate_auc(pos, neg) == pytest.approx(_brute_auc(pos, neg))
    assert _gate_auc([2, 3], [0, 1]) == 1.0
    assert _gate_auc([0, 1], [2, 3]) == 0.0
    assert _gate_auc([1, 1], [1]) == 0.5


def _records(n):
    return [
        {"id": f"r{i}", "messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                                     {"role": "assistant", "content": f"{i} plus {i} is {2 * i} because we add"}]}
        for i in range(n)
    ]  # fmt: skip


def test_probe_set_twins_and_donors():
    items = build_probe_set(_records(5), seed=3)
    assert len(items) == 5 * 5
    kinds = {it["kind"] for it in items}
    assert kinds == {"clean", "shuffle_words", "swap_response", "truncate", "noise"}
    by_pair = {}
    for it in items:
        by_pair.setdefault(it["pair"], {})[it["kind"]] = it["messages"][-1]["content"]
    for twins in by_pair.values():
        for kind in ("shuffle_words", "swap_response", "truncate", "noise"):
            assert twins[kind] != twins["clean"], kind
    assert build_probe_set(_records(5), seed=3) == items  # deterministic


@pytest.fixture(scope="module")
def selector_dir(tmp_path_factory):
    from selectmoe.model.tiny import build_tiny_select_moe, train_bpe_tokenizer

    root = tmp_path_factory.mktemp("probe")
    texts = [m["content"] for r in _records(40) for m in r["messages"]]
    tok = train_bpe_tokenizer(texts, vocab_size=300)
    model = build_tiny_select_moe(tok, seed=0)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root


def test_probe_uses_the_scoring_definition(selector_dir):
    """The probe's per-sample score is exactly the scoring stage's ``quality`` (same encoder + scope)."""
    from selectmoe.data.encoding import ChatEncoder, EncodingSpec, pad_batch
    from selectmoe.model import load_selector
    from selectmoe.scoring.model import score_batch
    from selectmoe.scoring.probe import ProbeEval, probe, score_messages

    model, tok, _ = load_selector(selector_dir / "model")
    with torch.no_grad():  # make the gates differ per token so the score is not constant
        for name, p in model.named_parameters():
            if "quality_gate" in name:
                p.normal_(0, 0.5)
    enc = ChatEncoder(tok, EncodingSpec(max_length=64, label_mode="full_sequence_mask_tags"))
    recs = _records(6)
    got = score_messages(model, enc, [r["messages"] for r in recs], batch_size=4)
    for i, r in enumerate(recs):  # one at a time, unpadded
        e = enc.encode(r["messages"])
        b = pad_batch([e], tok.pad_token_id)
        ref = score_batch(
            model, b["input_ids"], b["attention_mask"], b["labels"], scope=model.config.quality_token_scope
        )
        assert got[i] == pytest.approx(float(ref["quality"][0]), abs=1e-5)

    items = build_probe_set(recs, seed=0)
    result = probe(model, enc, items)
    # every scorer next to the gate, from the same pass: AUC == sklearn's on the scores themselves
    from sklearn.metrics import roc_auc_score

    from selectmoe.scoring.probe import score_messages_all

    cols = score_messages_all(model, enc, [it["messages"] for it in items])
    clean = np.array([it["kind"] == "clean" for it in items])
    assert set(result["scorers"]) == {
        "gate", "response_nll", "sample_nll", "ifd", "gate_ppl_rank", "nll_ifd_min", "nll_ifd_text",
    }  # fmt: skip
    assert result["probe_auc"] == result["scorers"]["gate"]["overall"]
    assert result["probe_auc"] == pytest.approx(roc_auc_score(clean, cols["quality"]))
    assert result["scorers"]["response_nll"]["overall"] == pytest.approx(
        roc_auc_score(clean, -cols["response_nll"])
    )
    assert result["scorers"]["ifd"]["overall"] == pytest.approx(roc_auc_score(clean, -cols["ifd"]))
    noise = clean | np.array([it["kind"] == "noise" for it in items])
    assert result["scorers"]["sample_nll"]["noise"] == pytest.approx(
        roc_auc_score(clean[noise], -cols["sample_nll"][noise])
    )
    assert set(result["per_corruption"]) == {"shuffle_words", "swap_response", "truncate", "noise"}
    flat = ProbeEval(recs, str(selector_dir / "model"), enc.spec.to_dict(), seed=0)(model)
    assert flat["probe_auc"] == pytest.approx(result["probe_auc"])
    assert "probe_auc_noise" in flat
    assert flat["probe_response_nll_auc"] == pytest.approx(result["scorers"]["response_nll"]["overall"])


@pytest.mark.pinned
def test_probe_cli(selector_dir, tmp_path, capsys):
    """The CLI on a selector whose gates carry a (seeded random) signal: its AUCs are pinned (CPU, fp32)."""
    from selectmoe.cli import main
    from selectmoe.model import load_selector

    model, tok, _ = load_selector(selector_dir / "model")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "quality_gate" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "gated")
    tok.save_pretrained(tmp_path / "gated")
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in _records(12)))
    assert main(["probe", str(tmp_path / "gated"), str(pool), "--n", "6", "--seed", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_clean"] == 6 and out["n_corrupt"] == 24
    assert out["probe_auc"] == pytest.approx(PINNED_CLI_AUC, abs=1e-4)
    assert out["per_corruption"] == pytest.approx(PINNED_CLI_PER_KIND, abs=1e-4)


PINNED_CLI_AUC = 0.5208  # 6 clean x 24 twins: multiples of 1/144
PINNED_CLI_PER_KIND = {"noise": 0.5278, "shuffle_words": 0.4722, "swap_response": 0.4444, "truncate": 0.6389}
