"""A generated, license-clean demo pool with known-bad twins, plus a matching multiple-choice eval set.

Seven skills, each its own ``dataset`` name (``SKILLS``): arithmetic word problems, sorting numbers,
reversing a word, unit conversion, capitals (small built-in table), odd/even and counting letters. Each
clean row is a natural-language question with a correct, explained answer ending in "The answer is X.".
Known-bad twins copy a clean row and corrupt its answer with one of ``BAD_KINDS`` (the four
``selectmoe.data.corruptions`` plus ``wrong_answer``: the same explanation with a wrong result).

Files written to ``out_dir`` (the pool dir)::

    pool-a.jsonl, pool-b.jsonl   messages-format rows (+ ``n_malformed`` deliberately broken rows)
    pool-c.parquet               ~20% of the rows, to exercise the Parquet reader

Labels (``{"id", "label"}`` with label ``clean`` or the bad kind, one per well-formed row) go to
``out_dir.parent / f"{out_dir.name}_labels.jsonl"`` so ingest never reads them. About 10% of rows carry
no ``id``: their label id is :func:`selectmoe.data.records.stable_id`, exactly what ingest assigns.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selectmoe.data.corruptions import CORRUPTIONS, corrupt, shuffle_words
from selectmoe.data.records import stable_id

BAD_KINDS = (*CORRUPTIONS, "wrong_answer")
MALFORMED_KINDS = ("broken_json", "no_assistant_turn", "unknown_role", "empty_content", "missing_messages")
SYSTEM_PROMPTS = (
    "You are a helpful tutor. Explain your reasoning briefly.",
    "You are a careful assistant that shows its work.",
)


@dataclass
class _Item:
    prompt: str
    explain: Callable[[str], str]  # explained answer text for a given final answer
    correct: str
    wrong: list[str]  # 3 distinct wrong final answers

    @property
    def answer(self) -> str:
        return self.explain(self.correct)


# --------------------------------------------------------------------------- skills
_NAMES = ("Sara", "Tom", "Aisha", "Ken", "Maria", "Luis", "Mei", "Omar", "Nina", "Jack", "Priya", "Leo")
_THINGS = (
    "apples",
    "pencils",
    "stickers",
    "marbles",
    "books",
    "cookies",
    "stamps",
    "shells",
    "cards",
    "coins",
)


def _wrong_numbers(correct: int, rng: random.Random, spread: int = 5) -> list[str]:
    out: set[int] = set()
    while len(out) < 3:
        v = correct + rng.choice([-1, 1]) * rng.randint(1, spread)
        if v != correct and v >= 0:
            out.add(v)
    return [str(v) for v in sorted(out)]


def _arithmetic(rng: random.Random) -> _Item:
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    op = rng.choice(("add", "sub", "mul"))
    if op == "add":
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        prompt = rng.choice(
            (
                f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?",
                f"There are {a} {thing} in a box and someone adds {b} more. How many {thing} are in the box?",
            )
        )
        c = a + b

        def explain(v: str) -> str:
            return f"We start with {a} {thing} and add {b}, so {a} + {b} = {v}. The answer is {v}."

    elif op == "sub":
        a = rng.randint(10, 90)
        b = rng.randint(1, a - 1)
        prompt = rng.choice(
            (
                f"{name} had {a} {thing} and gave away {b}. How many {thing} are left?",
                f"A shelf holds {a} {thing}. If {b} are taken away, how many {thing} remain?",
            )
        )
        c = a - b

        def explain(v: str) -> str:
            return f"We start with {a} {thing} and take away {b}, so {a} - {b} = {v}. The answer is {v}."

    else:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        prompt = rng.choice(
            (
                f"{name} buys {a} bags with {b} {thing} in each bag. How many {thing} is that in total?",
                f"There are {a} rows of {thing} with {b} in each row. How many {thing} are there?",
            )
        )
        c = a * b

        def explain(v: str) -> str:
            return f"There are {a} groups of {b}, so {a} × {b} = {v}. The answer is {v}."

    return _Item(prompt, explain, str(c), _wrong_numbers(c, rng))


def _sorting(rng: random.Random) -> _Item:
    nums = rng.sample(range(1, 100), rng.randint(4, 6))
    shown = ", ".join(map(str, nums))
    prompt = rng.choice(
        (
            f"Sort these numbers from smallest to largest: {shown}.",
            f"Put the following numbers in ascending order: {shown}.",
            f"Can you order {shown} from least to greatest?",
        )
    )
    correct = ", ".join(map(str, sorted(nums)))
    wrong: list[str] = []
    cands = [sorted(nums, reverse=True), nums]
    while len(wrong) < 3:
        cand = cands.pop() if cands else rng.sample(nums, len(nums))
        s = ", ".join(map(str, cand))
        if s != correct and s not in wrong:
            wrong.append(s)
    lo, hi = min(nums), max(nums)

    def explain(v: str) -> str:
        return f"The smallest number is {lo} and the largest is {hi}. In ascending order: {v}. The answer is {v}."

    return _Item(prompt, explain, correct, wrong)


_WORDS = (
    "garden", "planet", "window", "rocket", "silver", "forest", "bridge", "candle", "pencil", "castle",
    "dragon", "button", "marble", "orange", "yellow", "spring", "winter", "summer", "anchor", "basket",
    "pirate", "tunnel", "violin", "wizard", "harbor", "jungle", "kitten", "lemon", "mirror", "number",
)  # fmt: skip


def _reverse_word(rng: random.Random) -> _Item:
    word = rng.choice(_WORDS)
    prompt = rng.choice(
        (
            f'Write the word "{word}" backwards.',
            f'What do you get if you reverse the letters of "{word}"?',
            f'Spell "{word}" in reverse order.',
        )
    )
    correct = word[::-1]
    wrong: list[str] = []
    for cand in (word, word[1:][::-1] + word[0], correct[1:] + correct[0], correct[::-1][1:] + word[0]):
        if cand != correct and cand not in wrong and len(wrong) < 3:
            wrong.append(cand)
    while len(wrong) < 3:
        cand = "".join(rng.sample(word, len(word)))
        if cand != correct and cand not in wrong:
            wrong.append(cand)

    def explain(v: str) -> str:
        letters = ", ".join(reversed(word))
        return f'Reading "{word}" from the last letter to the first gives {letters}, which is "{v}". The answer is {v}.'

    return _Item(prompt, explain, correct, wrong)


_UNITS = (
    ("kilometers", "meters", 1000),
    ("meters", "centimeters", 100),
    ("kilograms", "grams", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("liters", "milliliters", 1000),
    ("days", "hours", 24),
    ("feet", "inches", 12),
)


def _unit_conversion(rng: random.Random) -> _Item:
    big, small, factor = rng.choice(_UNITS)
    n = rng.randint(2, 15)
    prompt = rng.choice(
        (
            f"How many {small} are in {n} {big}?",
            f"Convert {n} {big} to {small}.",
            f"{n} {big} is how many {small}?",
        )
    )
    c = n * factor
    wrong = sorted({str(c + factor), str(max(1, c - factor)), str(n * factor * 10)} - {str(c)})
    while len(wrong) < 3:
        wrong.append(str(c + len(wrong) + 1))

    def explain(v: str) -> str:
        return f"One {big[:-1]} is {factor} {small}, so {n} {big} is {n} × {factor} = {v} {small}. The answer is {v}."

    return _Item(prompt, explain, str(c), wrong[:3])


_CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Brazil", "Brasilia"), ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"), ("India", "New Delhi"), ("China", "Beijing"), ("Mexico", "Mexico City"),
    ("Peru", "Lima"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Poland", "Warsaw"),
    ("Portugal", "Lisbon"), ("Greece", "Athens"), ("Turkey", "Ankara"), ("Argentina", "Buenos Aires"),
    ("Chile", "Santiago"), ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"), ("Nigeria", "Abuja"), ("Morocco", "Rabat"), ("Finland", "Helsinki"),
    ("South Korea", "Seoul"),
)  # fmt: skip


def _capitals(rng: random.Random) -> _Item:
    country, capital = rng.choice(_CAPITALS)
    prompt = rng.choice(
        (
            f"What is the capital of {country}?",
            f"Which city is the capital of {country}?",
            f"Name the capital city of {country}.",
        )
    )
    others = [c for _, c in _CAPITALS if c != capital]
    wrong = rng.sample(others, 3)

    def explain(v: str) -> str:
        return f"The seat of the national government of {country} is {v}. The answer is {v}."

    return _Item(prompt, explain, capital, wrong)


def _odd_even(rng: random.Random) -> _Item:
    n = rng.randint(1, 999)
    prompt = rng.choice((f"Is {n} odd or even?", f"Tell me whether the number {n} is even or odd."))
    correct = "even" if n % 2 == 0 else "odd"
    wrong = [w for w in ("odd", "even", "neither", "both") if w != correct][:3]

    def explain(v: str) -> str:
        return f"{n} divided by 2 leaves a remainder of {n % 2}, so {n} is {v}. The answer is {v}."

    return _Item(prompt, explain, correct, wrong)


def _letter_count(rng: random.Random) -> _Item:
    word = rng.choice((*_WORDS, "banana", "balloon", "committee", "mississippi", "letter", "apple"))
    letter = rng.choice(sorted(set(word)))
    prompt = rng.choice(
        (
            f'How many times does the letter "{letter}" appear in the word "{word}"?',
            f'Count the letter "{letter}" in "{word}".',
        )
    )
    c = word.count(letter)
    wrong = _wrong_numbers(c, rng, spread=3)

    def explain(v: str) -> str:
        spelled = ", ".join(word)
        times = "time" if v == "1" else "times"
        return f'The letters of "{word}" are {spelled}. The letter "{letter}" appears {v} {times}. The answer is {v}.'

    return _Item(prompt, explain, str(c), wrong)


SKILLS: dict[str, Callable[[random.Random], _Item]] = {
    "arithmetic": _arithmetic,
    "sorting": _sorting,
    "reverse_word": _reverse_word,
    "unit_conversion": _unit_conversion,
    "capitals": _capitals,
    "odd_even": _odd_even,
    "letter_count": _letter_count,
}


# --------------------------------------------------------------------------- pool
@dataclass
class DemoPool:
    paths: list[Path]  # the JSONL pool files (line-per-row text)
    labels_path: Path
    parquet_paths: list[Path] = field(default_factory=list)
    pool_dir: Path | None = None
    label_counts: dict[str, int] = field(default_factory=dict)
    n_malformed: int = 0

    @property
    def all_paths(self) -> list[Path]:
        return [*self.paths, *self.parquet_paths]


def _malformed_row(kind: str, rng: random.Random) -> str:
    item = _arithmetic(rng)
    if kind == "broken_json":
        return json.dumps({"dataset": "arithmetic", "messages": [{"role": "user", "content": item.prompt}]})[
            :-9
        ]
    if kind == "no_assistant_turn":
        msgs = [{"role": "user", "content": item.prompt}]
    elif kind == "unknown_role":
        msgs = [{"role": "user", "content": item.prompt}, {"role": "robot", "content": item.answer}]
    elif kind == "empty_content":
        msgs = [{"role": "user", "content": item.prompt}, {"role": "assistant", "content": "   "}]
    else:  # missing_messages
        return json.dumps({"dataset": "arithmetic", "id": "malformed-missing-messages", "text": item.prompt})
    return json.dumps({"dataset": "arithmetic", "messages": msgs}, ensure_ascii=False)


def build_demo_pool(
    out_dir: str | Path,
    *,
    n_clean: int,
    bad_fraction: float,
    seed: int,
    n_malformed: int | None = None,
    parquet_fraction: float = 0.2,
    missing_id_fraction: float = 0.1,
) -> DemoPool:
    """Write the demo pool; ``bad_fraction`` is the share of *pool rows* that are known-bad twins.

    ``n_malformed`` (default 4 when ``bad_fraction > 0``, else 0) broken rows are added to the JSONL files
    to exercise quarantine; they have no label.
    """
    if not 0.0 <= bad_fraction < 1.0:
        raise ValueError(f"bad_fraction must be in [0, 1), got {bad_fraction}")
    rng = random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("pool-*.jsonl")) + list(out.glob("pool-*.parquet")):
        old.unlink()
    names = list(SKILLS)

    clean: list[dict[str, Any]] = []
    items: list[_Item] = []
    for i in range(n_clean):
        dataset = names[i % len(names)]
        item = SKILLS[dataset](rng)
        msgs = [{"role": "user", "content": item.prompt}, {"role": "assistant", "content": item.answer}]
        if rng.random() < 0.2:
            msgs.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        clean.append({"dataset": dataset, "messages": msgs})
        items.append(item)

    n_bad = round(n_clean * bad_fraction / (1.0 - bad_fraction)) if n_clean else 0
    rows: list[tuple[dict[str, Any], str]] = [(r, "clean") for r in clean]
    for j in range(n_bad):
        kind = BAD_KINDS[j % len(BAD_KINDS)]
        k = rng.randrange(n_clean)
        src = clean[k]
        if kind == "wrong_answer":
            bad = json.loads(json.dumps(src))
            bad["messages"][-1]["content"] = items[k].explain(rng.choice(items[k].wrong))
        else:
            donor = None
            if kind == "swap_response":
                while donor is None or donor["dataset"] == src["dataset"]:
                    donor = clean[rng.randrange(n_clean)]
            bad = corrupt(src, kind, rng, donor=donor)
        rows.append((bad, kind))
    rng.shuffle(rows)

    # ids: explicit for most rows, missing (-> stable id at ingest) for some whose stable id is unique.
    used: set[str] = set()
    out_rows: list[tuple[dict[str, Any], str, str]] = []
    for k, (rec, label) in enumerate(rows):
        rid = f"{rec['dataset']}-{k:06d}"
        omit = False
        if rng.random() < missing_id_fraction:
            sid = stable_id(rec["dataset"], rec["messages"])
            if sid not in used:
                rid, omit = sid, True
        used.add(rid)
        row = (
            {"dataset": rec["dataset"], "messages": rec["messages"]}
            if omit
            else {
                "dataset": rec["dataset"],
                "id": rid,
                "messages": rec["messages"],
            }
        )
        out_rows.append((row, label, rid))

    n_parquet = int(len(out_rows) * parquet_fraction)
    n_jsonl = len(out_rows) - n_parquet
    half = (n_jsonl + 1) // 2
    parts = {"pool-a.jsonl": out_rows[:half], "pool-b.jsonl": out_rows[half:n_jsonl]}
    pq_rows = out_rows[n_jsonl:]

    if n_malformed is None:
        n_malformed = 4 if bad_fraction > 0 else 0
    jsonl_lines: dict[str, list[str]] = {
        name: [json.dumps(r, ensure_ascii=False) for r, _, _ in part] for name, part in parts.items()
    }
    for m in range(n_malformed):
        kind = MALFORMED_KINDS[m % len(MALFORMED_KINDS)]
        name = ("pool-a.jsonl", "pool-b.jsonl")[m % 2]
        lines = jsonl_lines[name]
        lines.insert(rng.randint(0, len(lines)), _malformed_row(kind, rng))

    paths = []
    for name, lines in jsonl_lines.items():
        p = out / name
        p.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        paths.append(p)
    parquet_paths = []
    if pq_rows:
        import pyarrow as pa
        import pyarrow.parquet as pq

        msg_type = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
        table = pa.table(
            {
                "dataset": pa.array([r["dataset"] for r, _, _ in pq_rows], pa.string()),
                "id": pa.array([r.get("id") for r, _, _ in pq_rows], pa.string()),
                "messages": pa.array([r["messages"] for r, _, _ in pq_rows], msg_type),
            }
        )
        p = out / "pool-c.parquet"
        pq.write_table(table, p)
        parquet_paths.append(p)

    labels_path = out.parent / f"{out.name}_labels.jsonl"
    ordered = [*parts["pool-a.jsonl"], *parts["pool-b.jsonl"], *pq_rows]
    labels_path.write_text(
        "".join(json.dumps({"id": rid, "label": label}) + "\n" for _, label, rid in ordered), encoding="utf-8"
    )
    return DemoPool(
        paths=paths,
        labels_path=labels_path,
        parquet_paths=parquet_paths,
        pool_dir=out,
        label_counts=dict(Counter(label for _, label, _ in ordered)),
        n_malformed=n_malformed,
    )


# --------------------------------------------------------------------------- eval
EVAL_CHOICE_KINDS = ("clean", "wrong_answer", "shuffle_words", "swap_response")


def build_demo_eval(out_dir: str | Path, *, n: int, seed: int) -> Path:
    """``out_dir/demo_eval.jsonl``: ``{"question", "choices": [4 str], "answer": int, "skill", "kinds"}``
    rows, round-robin over the skills, questions the pool never holds.

    The four choices are what the pool's rows teach for this question: the correct explained answer
    (``clean``), and what three of the known-bad kinds would teach instead: the same explanation with a
    wrong result (``wrong_answer``), the correct answer's words shuffled (``shuffle_words``) and the
    answer to another skill's question (``swap_response``). ``kinds[j]`` names choice ``j``. A finetune
    on clean rows makes the correct answer more likely against all three; bad rows in the training set
    teach the model to accept wrong results, garbled word order and answers that ignore the question --
    which is what selection is meant to keep out. Every choice is a full answer in the pool's format: a
    bare "42" right after the assistant tag is text the model never sees in training (its likelihood
    measured answer-length priors, not the skill)."""
    rng = random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(SKILLS)
    lines = []
    for i in range(n):
        skill = names[i % len(names)]
        item = SKILLS[skill](rng)
        donor = SKILLS[names[(i + rng.randint(1, len(names) - 1)) % len(names)]](rng)
        texts = {
            "clean": item.answer,
            "wrong_answer": item.explain(rng.choice(item.wrong)),
            "shuffle_words": shuffle_words(item.answer, rng),
            "swap_response": donor.answer,
        }
        kinds = list(EVAL_CHOICE_KINDS)
        rng.shuffle(kinds)
        lines.append(
            json.dumps(
                {
                    "question": item.prompt,
                    "choices": [texts[k] for k in kinds],
                    "answer": kinds.index("clean"),
                    "skill": skill,
                    "kinds": kinds,
                },
                ensure_ascii=False,
            )
        )
    path = out / "demo_eval.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def build_demo_dev(out_dir: str | Path, *, per_skill: int, seed: int) -> Path:
    """``out_dir/demo_dev.jsonl``: the demo task's few-shot split, ``per_skill`` rows per skill in the
    eval format, none of whose questions is in ``out_dir/demo_eval.jsonl`` (the test questions).

    Why a separate split: targeted selection (``select.target``) reads a task's few-shot examples as its
    targets, and must never see the questions it is scored on."""
    out = Path(out_dir)
    test = {
        json.loads(line)["question"] for line in (out / "demo_eval.jsonl").read_text().splitlines() if line
    }
    rng = random.Random(seed)
    lines = []
    for skill, make in SKILLS.items():
        kept = 0
        while kept < per_skill:
            item = make(rng)
            if item.prompt in test:
                continue
            finals = [item.correct, *item.wrong[:3]]
            rng.shuffle(finals)
            row = {"question": item.prompt, "choices": [item.explain(v) for v in finals],
                   "answer": finals.index(item.correct), "skill": skill}  # fmt: skip
            lines.append(json.dumps(row, ensure_ascii=False))
            kept += 1
    path = out / "demo_dev.jsonl"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path
