"""OLMoE → Select-MoE conversion: logits verified on a padded batch, refusal of wrong sources."""

from __future__ import annotations

import json

import pytest
import torch

import selectmoe.model  # noqa: F401  (registers the Select-MoE Auto classes)
from selectmoe.model import SelectMoeForCausalLM, convert_olmoe
from selectmoe.model.convert import build_select_moe_from_olmoe, verify_logits
from selectmoe.model.tiny import build_tiny_dense_target, build_tiny_olmoe, train_bpe_tokenizer


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    tok = train_bpe_tokenizer([f"convert {i} tiny olmoe to select moe {i % 3}" for i in range(200)], 300)
    root = tmp_path_factory.mktemp("convert")
    olmoe = build_tiny_olmoe(tok, seed=3)
    olmoe.save_pretrained(root / "olmoe")
    tok.save_pretrained(root / "olmoe")
    return {"root": root, "dir": root / "olmoe", "tok": tok}


def test_convert_reproduces_olmoe_logits(source):
    from transformers import AutoModelForCausalLM, OlmoeForCausalLM

    dst = source["root"] / "converted"
    result = convert_olmoe(source["dir"], dst, gate_init_bias=3.0, gate_init_std=0.05)
    assert result.verified and result.max_abs_diff is not None and result.max_abs_diff <= 1e-5
    summary = result.summary()
    assert summary["n_quality_gate_params"] == 4 * (128 + 1) and summary["tokenizer_saved"]
    assert json.loads((dst / "config.json").read_text())["model_type"] == "select_moe"
    assert (dst / "model.safetensors").is_file() and (dst / "tokenizer.json").is_file()
    manifest = json.loads((dst / "_manifest.json").read_text())
    assert manifest["stage"] == "convert"

    # independent check on the saved files: gates open -> OLMoE's logits on a right-padded batch
    olmoe = OlmoeForCausalLM.from_pretrained(source["dir"]).eval()
    model = AutoModelForCausalLM.from_pretrained(dst).eval()
    assert isinstance(model, SelectMoeForCausalLM)
    for layer in model.model.layers:
        assert torch.equal(layer.quality_gate.bias.detach(), torch.tensor([3.0]))
    src_sd, dst_sd = olmoe.state_dict(), model.state_dict()
    assert all(torch.equal(src_sd[k], dst_sd[k]) for k in src_sd)
    assert set(dst_sd) - set(src_sd) == {
        f"model.layers.{i}.quality_gate.{p}" for i in range(4) for p in ("weight", "bias")
    }
    ids = torch.randint(2, 300, (3, 14), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = source["tok"].pad_token_id
    with torch.no_grad():
        for layer in model.model.layers:
            layer.quality_gate.bias.fill_(1e4)
        ref = olmoe(ids, attention_mask=mask).logits
        out = model(ids, attention_mask=mask).logits
    assert float((ref - out)[mask.bool()].abs().max()) <= 1e-5


def test_verify_detects_a_wrong_model(source):
    from transformers import OlmoeForCausalLM

    olmoe = OlmoeForCausalLM.from_pretrained(source["dir"]).eval()
    model, _ = build_select_moe_from_olmoe(olmoe)
    assert verify_logits(olmoe, model) <= 1e-5
    with torch.no_grad():
        model.model.layers[2].mlp.experts.down_proj.mul_(1.5)
    with pytest.raises(RuntimeError, match="max-abs-diff"):
        verify_logits(olmoe, model)
    # the gate biases are restored after verification
    assert torch.equal(model.model.layers[0].quality_gate.bias.detach(), torch.tensor([4.0]))


def test_refuses_non_olmoe_source(source, tmp_path):
    dense = build_tiny_dense_target(source["tok"], arch="llama")
    dense.save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="model_type 'llama'"):
        convert_olmoe(tmp_path / "llama", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"no config\.json"):
        convert_olmoe(tmp_path / "missing", tmp_path / "out")


def test_refuses_mismatched_tensors(source, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(source["dir"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_experts"] = 8  # the tensors hold 16 experts
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not match"):
        convert_olmoe(bad, tmp_path / "out")
