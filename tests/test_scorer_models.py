"""Any HF causal LM as the scorer (dense / HF MoE / Select-MoE), pooled hidden-state features, text signals."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from tiny_words import WORDS


@pytest.fixture(scope="module")
def tok():
    from selectmoe.model.tiny import train_bpe_tokenizer

    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, 12)) for _ in range(40)]
    return train_bpe_tokenizer([*texts, "<|user|>\n <|assistant|>\n <|system|>\n"] * 4, vocab_size=400)


def _batch(tok, n=4, seed=1):
    from selectmoe.data.encoding import ChatEncoder, EncodingSpec, pad_batch

    enc = ChatEncoder(tok, EncodingSpec(max_length=64))
    rng = np.random.default_rng(seed)
    items = [
        enc.encode(
            [
                {"role": "user", "content": " ".join(rng.choice(WORDS, int(rng.integers(2, 10))))},
                {"role": "assistant", "content": " ".join(rng.choice(WORDS, int(rng.integers(2, 20))))},
            ]
        )
        for _ in range(n)
    ]
    assert len({e.n_tokens for e in items}) > 1  # really padded
    return items, pad_batch(items, tok.pad_token_id)


def test_dense_hidden_is_the_position_weighted_mean_of_the_last_layer_and_padding_free(tok):
    """RDS+ pooling, checked against the model's own last_hidden_state; a dense model has no gate/routing."""
    from selectmoe.data.encoding import pad_batch
    from selectmoe.model.tiny import build_tiny_dense_target
    from selectmoe.scoring.model import score_batch

    model = build_tiny_dense_target(tok, arch="qwen2", seed=0).eval()
    items, padded = _batch(tok)
    stats = score_batch(
        model, padded["input_ids"], padded["attention_mask"], padded["labels"], scope="all", hidden=True
    )
    assert set(stats) == {"hidden", "sample_nll", "response_nll"}  # no fake gate, no routing
    with torch.no_grad():
        for i, e in enumerate(items):
            h = model.model(input_ids=torch.tensor([e.input_ids])).last_hidden_state[0]  # [n, H]
            w = torch.arange(1, len(e.input_ids) + 1, dtype=torch.float32)
            want = (w[:, None] * h).sum(0) / w.sum()
            want = (want / want.norm()).numpy()
            np.testing.assert_allclose(stats["hidden"][i], want, atol=1e-5, rtol=0)
            one = pad_batch([e], tok.pad_token_id)
            alone = score_batch(
                model, one["input_ids"], one["attention_mask"], one["labels"], scope="all", hidden=True
            )
            np.testing.assert_allclose(alone["hidden"][0], stats["hidden"][i], atol=1e-5, rtol=0)
            np.testing.assert_allclose(alone["sample_nll"][0], stats["sample_nll"][i], atol=1e-5, rtol=0)


def test_hf_moe_routing_is_the_token_mean_of_its_router_softmax(tok):
    from selectmoe.model.tiny import build_tiny_olmoe
    from selectmoe.scoring.model import score_batch

    model = build_tiny_olmoe(tok, seed=0).eval()
    _, padded = _batch(tok)
    stats = score_batch(model, padded["input_ids"], padded["attention_mask"], padded["labels"], scope="all")
    assert "quality" not in stats and "hidden" not in stats
    with torch.no_grad():
        out = model(
            input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], output_router_logits=True
        )
    mask = padded["attention_mask"].float()
    b, t = mask.shape
    want = torch.cat(
        [
            (torch.softmax(r.float(), -1).reshape(b, t, -1) * mask[..., None]).sum(1)
            / mask.sum(1, keepdim=True)
            for r in out.router_logits
        ],
        dim=1,
    )
    cfg = model.config
    assert stats["routing"].shape == (b, cfg.num_hidden_layers * cfg.num_experts)
    np.testing.assert_allclose(stats["routing"], want.numpy(), atol=1e-6, rtol=0)
    assert want.shape[1] == cfg.num_hidden_layers * cfg.num_experts


def test_projection_is_fixed_and_keeps_cosines():
    from selectmoe.scoring.features import PROJECTION_SEED, projection_matrix, stored_hidden_dim

    assert projection_matrix(128, 512) is None and stored_hidden_dim(128, 512) == 128
    r = projection_matrix(2048, 512)
    assert r.shape == (2048, 512) and torch.equal(r, projection_matrix(2048, 512))
    g = torch.Generator().manual_seed(PROJECTION_SEED)
    assert torch.equal(r, torch.randn(2048, 512, generator=g) / 512**0.5)
    # JL: cosines of correlated vectors survive the 4x reduction within a few hundredths
    base = torch.randn(1, 2048, generator=torch.Generator().manual_seed(0))
    x = (
        base
        + torch.randn(40, 2048, generator=torch.Generator().manual_seed(1))
        * torch.linspace(0.2, 3, 40)[:, None]
    )
    x = x / x.norm(dim=1, keepdim=True)
    y = x @ r
    y = y / y.norm(dim=1, keepdim=True)
    err = (x @ x.T - y @ y.T).abs().max().item()
    assert err < 0.2, err


def test_text_signals_on_known_answers():
    from selectmoe.scoring.text_signals import char_rep_ratio, copy_ratio, text_signals, token_rep_ratio

    clean = np.arange(100, 130)  # 30 distinct tokens
    repeated = np.tile(np.arange(100, 112), 4)  # a 12-token sentence, four times
    assert token_rep_ratio(clean) == 0.0
    assert token_rep_ratio(repeated) == 1.0
    assert token_rep_ratio(np.r_[np.arange(100, 112), np.arange(200, 212)]) == 0.0
    prompt = np.arange(1, 41)
    assert copy_ratio(np.arange(5, 25), prompt) == 1.0
    assert copy_ratio(clean, prompt) == 0.0
    half = np.r_[np.arange(1, 13), np.arange(300, 312)]  # 17 8-grams, 5 inside the prompt
    assert copy_ratio(half, prompt) == pytest.approx(5 / 17)
    assert copy_ratio(np.arange(3, 8), prompt) == 1.0  # a 5-token answer inside the prompt: a copy
    assert copy_ratio(np.array([3, 9, 4, 5, 6]), prompt) == 0.0  # not contiguous there
    assert copy_ratio(np.arange(3, 6), prompt) == 0.0  # 3 tokens: never called a copy
    # Data-Juicer's character repetition: "abcdefghijk" x3 -> 24 10-grams, 11 distinct (2 thrice, 9 twice);
    # the sqrt(11)=3 most frequent take 3+3+2 of 24
    assert char_rep_ratio("abcdefghijk" * 3) == pytest.approx(8 / 24)
    assert char_rep_ratio("short") == 0.0
    out = text_signals([[1, 2, 3, *range(10, 20)]], [[-100, -100, -100, *range(10, 20)]], ["x"])
    assert out["answer_tokens"][0] == 10 and out["rep_ratio"][0] == 0.0
    # a 6-token prompt copied as the answer, closed by EOS (id 99): a copy once EOS is left out
    ids, labels = [5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 99], [-100] * 6 + [5, 6, 7, 8, 9, 10, 99]
    assert text_signals([ids], [labels], ["x"])["copy_ratio"][0] == 0.0
    with_eos = text_signals([ids], [labels], ["x"], eos_id=99)
    assert with_eos["copy_ratio"][0] == 1.0 and with_eos["answer_tokens"][0] == 6


def test_text_flags_rank_degenerate_answers_last():
    from selectmoe.selection.scorers import scorer_values

    n = 6
    cols = {
        "quality": None,
        "response_nll": np.array([3.0, 2.0, 1.0, 0.5, 0.2, 2.5]),  # rows 3, 4: "excellent" perplexity
        "sample_nll": np.ones(n),
        "ifd": np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.85]),
        "rep_ratio": np.array([0, 0, 0, 0.9, 0, 0]),
        "char_rep_ratio": np.zeros(n),
        "copy_ratio": np.array([0, 0, 0, 0, 1.0, np.nan]),
        "answer_tokens": np.full(n, 20.0),
    }
    plain = scorer_values(cols, "nll_ifd_min")
    guarded = scorer_values(cols, "nll_ifd_text")
    assert list(np.argsort(-plain)[:2]) == [4, 3]  # perplexity and IFD love them
    assert set(np.argsort(guarded)[:2]) == {3, 4}  # flagged: below every other row
    unflagged = [int(i) for i in np.argsort(-plain, kind="stable") if i not in (3, 4)]
    assert [int(i) for i in np.argsort(-guarded, kind="stable")[:4]] == unflagged  # their order is kept


@pytest.mark.slow
def test_run_ingest_score_select_with_a_dense_model(tok, tmp_path, ray_local):
    """`selectmoe run CONFIG 'stages=[ingest,score,select]' score.model_dir=DENSE`: no gate/routing columns,
    hidden features (forced on), select clusters on them, the manifest and report name the scorer."""
    from selectmoe.cli import main
    from selectmoe.model.tiny import build_tiny_dense_target
    from selectmoe.router_data import load_router_data

    model_dir = tmp_path / "dense"
    build_tiny_dense_target(tok, arch="llama", seed=0).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rng = np.random.default_rng(3)
    pool = tmp_path / "pool.jsonl"
    rows = []
    for i in range(30):
        answer = " ".join(rng.choice(WORDS, int(rng.integers(4, 16))))
        rows.append({"id": f"r{i}", "messages": [
            {"role": "user", "content": " ".join(rng.choice(WORDS, 6))},
            {"role": "assistant", "content": (answer + " ") * (4 if i % 10 == 0 else 1)},
        ]})  # fmt: skip
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    rc = main(
        [
            "run", "demo", "demo.enabled=false", "stages=[ingest,score,select]", f"output_dir={out}",
            f"score.model_dir={model_dir}", f"data.pool=[{pool}]", "score.batch_size=8", "select.k=3",
            "select.selection_percentage=0.2", "select.plots=false",
        ]
    )  # fmt: skip
    assert rc == 0
    shard = sorted((out / "router_data" / "shards").glob("*.parquet"))[0]
    schema = pq.read_schema(shard)
    assert (
        "quality" not in schema.names
        and "routing" not in schema.names
        and "quality_layers" not in schema.names
    )
    assert schema.field("hidden").type.list_size == 128 and schema.metadata[b"selectmoe.hidden_dim"] == b"128"
    data = load_router_data(out / "router_data", features=True)
    assert data.quality is None and data.routing is None and data.hidden.shape == (30, 128)
    np.testing.assert_allclose(np.linalg.norm(data.hidden.astype(np.float32), axis=1), 1.0, atol=2e-3)
    rep = dict(zip(data.ids, data.rep_ratio.tolist()))
    assert min(rep[i] for i in ("r0", "r10", "r20")) > 0.5  # the answers said four times
    assert max(v for i, v in rep.items() if i not in ("r0", "r10", "r20")) < 0.5
    manifest = json.loads((out / "router_data" / "_manifest.json").read_text())
    assert manifest["extra"]["scorer"]["kind"] == "dense"
    assert (
        "gate" not in manifest["extra"]["scorer"]["signals"]
        and "hidden" in manifest["extra"]["scorer"]["signals"]
    )
    selection = json.loads((out / "selection" / "selection.json").read_text())
    assert selection["counts"]["selected"] == 6 and selection["chosen_k"] == 3
    picked = [
        json.loads(x)["id"] for x in (out / "selection" / "selected_data.jsonl").read_text().splitlines()
    ]
    assert not {"r0", "r10", "r20"} & set(picked)  # the repeated answers are flagged by the default ranking


def test_router_data_without_gate_or_routing_round_trips_and_the_report_names_the_scorer(tmp_path):
    from selectmoe.manifest import write_manifest
    from selectmoe.report import build_router_report
    from selectmoe.router_data import RouterDataWriter, load_router_data

    router = tmp_path / "router"
    w = RouterDataWriter(router, "s0", 2, 0, gate=False, hidden_dim=4)
    hidden = np.eye(4)[[0, 1, 2]]
    w.write_batch(
        {
            "id": ["a", "b", "c"], "dataset": ["d"] * 3, "n_tokens": [5, 6, 7], "truncated": [False] * 3,
            "response_nll": [1.0, 2.0, 3.0], "rep_ratio": [0.0, 0.9, 0.1], "hidden": hidden,
        }
    )  # fmt: skip
    w.close()
    info = {"model_dir": "/m/gemma", "kind": "dense", "architecture": "Gemma3ForCausalLM"}
    write_manifest(
        router, stage="score", config={}, extra={"scorer": {**info, "signals": ["response_nll", "hidden"]}}
    )
    data = load_router_data(router, features=True)
    assert data.quality is None and data.quality_layers is None and data.routing is None
    np.testing.assert_array_equal(np.asarray(data.hidden, np.float32), hidden)
    np.testing.assert_array_equal(data.rep_ratio, np.float32([0.0, 0.9, 0.1]))
    assert np.isnan(data.copy_ratio).all()  # not given: NaN, flags nothing
    md = tmp_path / "report" / "report.md"
    build_router_report(router, tmp_path / "report")
    text = md.read_text()
    assert "| /m/gemma | dense | Gemma3ForCausalLM | response_nll, hidden |" in text
    assert "| rep_ratio | 0.3333 | 0.82 | 0.3333 |" in text  # mean, p95, share over the flag (0.5)
