"""The four response corruptions used by the warmup probe and the demo pool (known-bad twins), and two
degenerate-but-predictable ones (:data:`DEGENERATE`: the answer copies the prompt, or repeats its first
sentence) that a pretrained model finds *easy*, used by ``benchmarks/real_model.py``.

Each returns a *new* record (deep copy; ``id``/``dataset`` untouched) whose last assistant turn is
corrupted; deterministic given ``rng``.
"""

from __future__ import annotations

import copy
import random
import re
import string
from typing import Any

CORRUPTIONS = ("shuffle_words", "swap_response", "truncate", "noise")
DEGENERATE = ("copy_prompt", "repeat_sentence")
_NOISE_ALPHABET = string.ascii_letters + string.digits + string.punctuation + "    "


def _last_assistant(messages: list[dict[str, Any]]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "assistant":
            return i
    raise ValueError("record has no assistant turn to corrupt")


def shuffle_words(text: str, rng: random.Random) -> str:
    words = text.split()
    if len(words) < 2:
        return text[::-1] if len(text) > 1 else text + text
    shuffled = words[:]
    for _ in range(10):
        rng.shuffle(shuffled)
        if shuffled != words:
            break
    else:  # all words identical or unlucky: rotate
        shuffled = words[1:] + words[:1]
    return " ".join(shuffled)


def truncate_words(text: str, rng: random.Random, max_words: int = 3) -> str:
    words = text.split()
    if len(words) <= 1:
        return text[: max(1, len(text) // 2)]
    k = rng.randint(1, min(max_words, len(words) - 1))
    return " ".join(words[:k])


def noise_text(text: str, rng: random.Random) -> str:
    n = max(8, len(text))
    out = "".join(rng.choice(_NOISE_ALPHABET) for _ in range(n)).strip()
    return out or "#" * n


def first_sentence_repeated(text: str, rng: random.Random) -> str:
    """The answer's first sentence (or line), repeated until the answer is as long as before (3-5 times)."""
    match = re.match(r"\s*(.+?[.!?])(\s|$)", text, flags=re.S)
    first = (match.group(1) if match else text.strip().split("\n")[0]).strip() or text
    times = max(rng.randint(3, 5), -(-len(text) // max(len(first), 1)))
    return " ".join([first] * min(times, 20))


def _last_user(messages: list[dict[str, Any]], before: int) -> str:
    for i in range(before - 1, -1, -1):
        if messages[i].get("role") == "user":
            return messages[i]["content"]
    raise ValueError("record has no user turn before its last assistant turn")


def corrupt(
    record: dict[str, Any], kind: str, rng: random.Random, donor: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A corrupted copy of ``record`` (its last assistant turn); ``swap_response`` needs a ``donor`` record."""
    if kind not in CORRUPTIONS + DEGENERATE:
        raise ValueError(f"unknown corruption {kind!r}; expected one of {CORRUPTIONS + DEGENERATE}")
    new = copy.deepcopy(record)
    msgs = new["messages"]
    i = _last_assistant(msgs)
    text = msgs[i]["content"]
    if kind == "shuffle_words":
        msgs[i]["content"] = shuffle_words(text, rng)
    elif kind == "swap_response":
        if donor is None:
            raise ValueError("swap_response needs a donor record")
        dmsgs = donor["messages"]
        msgs[i]["content"] = dmsgs[_last_assistant(dmsgs)]["content"]
    elif kind == "truncate":
        msgs[i]["content"] = truncate_words(text, rng)
    elif kind == "copy_prompt":
        msgs[i]["content"] = _last_user(msgs, i)
    elif kind == "repeat_sentence":
        msgs[i]["content"] = first_sentence_repeated(text, rng)
    else:
        msgs[i]["content"] = noise_text(text, rng)
    return new
