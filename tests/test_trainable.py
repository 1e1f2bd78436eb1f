"""Trainable sets (counts, LoRA merged export) and the selector artefact round trip."""

from __future__ import annotations

import json

import pytest
import torch

import selectmoe.model  # noqa: F401  (registers the Select-MoE Auto classes)
from selectmoe.model import (
    SelectMoeConfig,
    apply_trainable,
    export_trainable,
    import_trainable,
    load_selector,
    save_selector,
)
from selectmoe.model.tiny import build_tiny_select_moe, train_bpe_tokenizer
from selectmoe.model.trainable import count_trainable

ENCODING = {"max_length": 64, "label_mode": "assistant_only"}


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(
        [f"trainable {i} sets and selector artefacts {i % 4}" for i in range(200)], 300
    )


@pytest.fixture(scope="module")
def base_dir(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "converted"
    model = build_tiny_select_moe(tok, seed=0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _ids(tok):
    ids = torch.randint(2, len(tok), (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ids[mask == 0] = tok.pad_token_id
    return ids, mask


def _train_step(model, tok, lr=0.5):
    ids, mask = _ids(tok)
    model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.grad is not None:
                p -= lr * p.grad.sign() * 0.01  # a visible, bounded update
    model.zero_grad()


def test_counts_on_olmoe_1b_7b_shapes():
    cfg = SelectMoeConfig(hidden_size=2048, num_hidden_layers=16, num_experts=64, intermediate_size=1024)
    assert count_trainable(cfg, "full_rank") == 16 * 64 * 2048 + 16 * (2048 + 1) == 2_129_936
    assert count_trainable(cfg, "gates_only") == 16 * 2049
    assert count_trainable(cfg, "lora", lora_r=16) == 16 * 16 * (64 + 2048) + 16 * 2049


def test_modes_select_the_right_parameters(tok):
    model = apply_trainable(build_tiny_select_moe(tok), "full_rank")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {f"model.layers.{i}.{s}" for i in range(4) for s in
                     ("mlp.gate.weight", "quality_gate.weight", "quality_gate.bias")}  # fmt: skip
    model = apply_trainable(build_tiny_select_moe(tok), "gates_only")
    assert all("quality_gate" in n for n, p in model.named_parameters() if p.requires_grad)
    assert set(export_trainable(model)) == {
        f"model.layers.{i}.quality_gate.{s}" for i in range(4) for s in ("weight", "bias")
    }
    with pytest.raises(ValueError):
        apply_trainable(model, "everything")


def test_lora_trains_and_exports_merged(tok):
    model = apply_trainable(build_tiny_select_moe(tok, seed=0), "lora", lora_r=4, lora_alpha=8)
    router = model.model.layers[0].mlp.gate
    base_w = router.parametrizations.weight.original.detach().clone()
    _train_step(model, tok)
    lora = router.parametrizations.weight[0]
    assert float(lora.lora_B.detach().abs().sum()) > 0  # the router LoRA really trained
    assert torch.equal(router.parametrizations.weight.original, base_w)  # base frozen
    tensors = export_trainable(model)
    merged = tensors["model.layers.0.mlp.gate.weight"]
    assert torch.allclose(merged, base_w + 2.0 * lora.lora_B @ lora.lora_A, atol=1e-7)
    # merged tensors in a plain model reproduce the LoRA model's forward
    plain = build_tiny_select_moe(tok, seed=0).eval()
    loaded = import_trainable(plain, tensors)
    assert len(loaded) == 3 * 4
    ids, mask = _ids(tok)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(
            plain(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits, atol=1e-5
        )


@pytest.mark.parametrize("mode", ["full_rank", "lora"])
def test_selector_round_trip(tok, base_dir, tmp_path, mode):
    model = apply_trainable(build_tiny_select_moe(tok, seed=0), mode)
    _train_step(model, tok)
    model.eval()
    out = save_selector(
        tmp_path / "selector",
        base_model_dir=str(base_dir),
        trainable_mode=mode,
        tensors=export_trainable(model),
        encoding=ENCODING,
        tokenizer=tok,
        config_overrides={"quality_token_scope": "trained"},
    )
    meta = json.loads((out / "selector.json").read_text())
    assert set(meta) == {"base_model_dir", "trainable_mode", "encoding", "model_config_overrides"}
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))  # no pickle
    loaded, tokenizer, encoding = load_selector(out)
    assert encoding == ENCODING and len(tokenizer) == len(tok)
    assert loaded.config.quality_token_scope == "trained" and not loaded.training
    ids, mask = _ids(tok)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, output_router_logits=True)
        got = loaded(ids, attention_mask=mask, output_router_logits=True)
    assert float((ref.logits - got.logits).abs().max()) <= 1e-5
    assert torch.allclose(
        ref.router_logits[2]["quality_score"], got.router_logits[2]["quality_score"], atol=1e-6
    )
    half, _, _ = load_selector(out, dtype="bfloat16")  # the gate and router stay fp32 (model.precision)
    assert half.model.layers[0].mlp.gate.weight.dtype == torch.float32
    assert half.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16


def test_load_plain_converted_dir(tok, base_dir):
    model, tokenizer, encoding = load_selector(base_dir)
    assert encoding == {} and tokenizer.pad_token == "<|pad|>"
    assert torch.equal(model.model.layers[0].quality_gate.bias.detach(), torch.tensor([4.0]))


def test_mismatched_checkpoint_is_refused(tok, base_dir, tmp_path):
    other = build_tiny_select_moe(tok, seed=0, num_experts=8)  # another base: 8 experts
    out = save_selector(
        tmp_path / "bad",
        base_model_dir=str(base_dir),
        trainable_mode="full_rank",
        tensors=export_trainable(other),
        encoding=ENCODING,
        tokenizer=None,
    )
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate.weight.*\(8, 128\).*\(16, 128\)"):
        load_selector(out)
