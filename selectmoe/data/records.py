"""The canonical record, format adapters and per-row validation.

Canonical record (the LESS / open-instruct "processed" format)::

    {"dataset": str, "id": str, "messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}

Adapters: ShareGPT ``{"conversations": [{"from": "human" | "gpt" | "system", "value": str}]}`` and Alpaca
``{"instruction", "input", "output"}``. ``fmt="auto"`` detects the format per row.

Validation failures are reported as short snake_case reason codes (see ``REASONS``); nothing is fixed up
silently except documented normalisations (ShareGPT empty system turns are dropped, as in the original).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")
FORMATS = ("auto", "messages", "sharegpt", "alpaca")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "system": "system",
}

# Reason codes (rejected.jsonl "reason" / manifest counts).
BROKEN_JSON = "broken_json"  # a JSONL line / JSON element that does not parse
TRUNCATED_JSON = "truncated_json"  # the cut-off tail of a JSON array / object stream
NOT_UTF8 = "not_utf8"
NOT_AN_OBJECT = "not_an_object"  # valid JSON but not an object (e.g. a bare list or string)
MISSING_MESSAGES = "missing_messages"
EMPTY_MESSAGES = "empty_messages"
BAD_MESSAGE = "bad_message"  # a message that is not an object / messages not a list
UNKNOWN_ROLE = "unknown_role"
NON_STRING_CONTENT = "non_string_content"
EMPTY_CONTENT = "empty_content"
NO_USER_TURN = "no_user_turn"
NO_ASSISTANT_TURN = "no_assistant_turn"
BAD_ID = "bad_id"  # id present but not a string or an integer (bool, float, list, object)
BAD_DATASET = "bad_dataset"  # dataset present but not a string (empty -> the input's dataset)
DUPLICATE_ID = "duplicate_id"
READ_ERROR = "read_error"  # the file (or a Parquet row group) could not be read at all
BINARY_FILE = "binary_file"  # the whole file is not text (NUL bytes, compressed data under a plain name)
REASONS = (
    BROKEN_JSON,
    TRUNCATED_JSON,
    NOT_UTF8,
    NOT_AN_OBJECT,
    MISSING_MESSAGES,
    EMPTY_MESSAGES,
    BAD_MESSAGE,
    UNKNOWN_ROLE,
    NON_STRING_CONTENT,
    EMPTY_CONTENT,
    NO_USER_TURN,
    NO_ASSISTANT_TURN,
    BAD_ID,
    BAD_DATASET,
    DUPLICATE_ID,
    READ_ERROR,
    BINARY_FILE,
)
FILE_REASONS = (READ_ERROR, BINARY_FILE)  # rejections of a whole file (or its unreadable rest)
OVER_LONG = "over_long"  # a flag, not a rejection: the row is kept (and truncated at encoding)

RAW_EXCERPT = 500


class RecordError(ValueError):
    """A row that fails validation: ``reason`` is a code from ``REASONS``, ``detail`` a human message."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Flag:
    reason: str
    detail: str = ""


def canonical_messages(messages: Sequence[Mapping[str, Any]]) -> str:
    """Canonical JSON of a message list (what ingested shards store and what ids hash)."""
    return json.dumps(
        [{"role": m["role"], "content": m["content"]} for m in messages],
        ensure_ascii=False,
        separators=(",", ":"),
    )


def stable_id(dataset: str, messages: Sequence[Mapping[str, Any]]) -> str:
    """Deterministic id for a record without one: sha1(dataset + NUL + canonical messages), 16 hex chars."""
    digest = hashlib.sha1(f"{dataset}\x00{canonical_messages(messages)}".encode())
    return digest.hexdigest()[:16]


def prompt_key(messages: Sequence[Mapping[str, Any]]) -> int | None:
    """A signed 64-bit key of a conversation's question side: its system and user turns in order
    (blake2b-8 of their canonical JSON). Two rows with one key ask the same thing; if their answers differ,
    at most one is right (``select.one_answer_per_prompt``). ``None`` for a conversation with no such turn
    (no question to share)."""
    asked = [m for m in messages if m.get("role") in ("system", "user")]
    if not asked:
        return None
    digest = hashlib.blake2b(canonical_messages(asked).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def excerpt(raw: Any, limit: int = RAW_EXCERPT) -> str:
    if not isinstance(raw, str):
        try:
            raw = json.dumps(raw, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            raw = repr(raw)
    return raw if len(raw) <= limit else raw[: limit - 3] + "..."


def detect_format(obj: Mapping[str, Any]) -> str:
    if "messages" in obj:
        return "messages"
    if "conversations" in obj:
        return "sharegpt"
    if "instruction" in obj or "output" in obj:
        return "alpaca"
    keys = sorted(map(str, obj))[:8]
    raise RecordError(
        MISSING_MESSAGES, f"no 'messages' (nor 'conversations' / 'instruction'+'output'); keys {keys}"
    )


def _from_sharegpt(obj: Mapping[str, Any]) -> list[dict[str, Any]]:
    conv = obj.get("conversations")
    if conv is None:
        raise RecordError(MISSING_MESSAGES, "no 'conversations'")
    if not isinstance(conv, list):
        raise RecordError(BAD_MESSAGE, f"'conversations' is {type(conv).__name__}, not a list")
    out = []
    for i, turn in enumerate(conv):
        if not isinstance(turn, Mapping):
            raise RecordError(BAD_MESSAGE, f"conversations[{i}] is {type(turn).__name__}, not an object")
        who = turn.get("from")
        role = SHAREGPT_ROLES.get(who.lower()) if isinstance(who, str) else None
        if role is None:
            raise RecordError(UNKNOWN_ROLE, f"conversations[{i}].from = {who!r}")
        value = turn.get("value")
        if role == "system" and isinstance(value, str) and not value.strip():
            continue  # the original drops empty system turns
        out.append({"role": role, "content": value})
    return out


def _from_alpaca(obj: Mapping[str, Any]) -> list[dict[str, Any]]:
    instruction, inp, output = obj.get("instruction"), obj.get("input", ""), obj.get("output")
    for key, val in (("instruction", instruction), ("input", inp), ("output", output)):
        if val is not None and not isinstance(val, str):
            raise RecordError(NON_STRING_CONTENT, f"alpaca '{key}' is {type(val).__name__}")
    user = (instruction or "").strip()
    if inp and inp.strip():
        user = f"{user}\n\n{inp.strip()}" if user else inp.strip()
    msgs = []
    system = obj.get("system")
    if isinstance(system, str) and system.strip():
        msgs.append({"role": "system", "content": system})
    msgs.append({"role": "user", "content": user})
    msgs.append({"role": "assistant", "content": output if output is not None else ""})
    return msgs


def _from_messages(obj: Mapping[str, Any]) -> list[dict[str, Any]]:
    msgs = obj.get("messages")
    if msgs is None:
        raise RecordError(MISSING_MESSAGES, "no 'messages'")
    if isinstance(msgs, str):  # an ingested shard stores the canonical JSON string
        try:
            msgs = json.loads(msgs)
        except json.JSONDecodeError as exc:
            raise RecordError(BAD_MESSAGE, f"'messages' is a string that is not JSON ({exc.msg})") from None
    if hasattr(msgs, "tolist"):  # numpy arrays from pandas-written Parquet
        msgs = msgs.tolist()
    if not isinstance(msgs, (list, tuple)):
        raise RecordError(BAD_MESSAGE, f"'messages' is {type(msgs).__name__}, not a list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, Mapping):
            raise RecordError(BAD_MESSAGE, f"messages[{i}] is {type(m).__name__}, not an object")
        out.append({"role": m.get("role"), "content": m.get("content")})
    return out


def normalize(obj: Any, *, fmt: str = "auto", default_dataset: str = "unknown") -> dict[str, Any]:
    """Adapt + validate one parsed row into a canonical record (``id`` may still be ``None``).

    Raises :class:`RecordError` with a reason code when the row is invalid.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if not isinstance(obj, Mapping):
        raise RecordError(NOT_AN_OBJECT, f"a JSON {type(obj).__name__}, not an object")
    kind = detect_format(obj) if fmt == "auto" else fmt
    if kind == "sharegpt":
        messages = _from_sharegpt(obj)
    elif kind == "alpaca":
        messages = _from_alpaca(obj)
    else:
        messages = _from_messages(obj)
    validate_messages(messages)

    dataset = obj.get("dataset")
    if dataset is None or (isinstance(dataset, str) and not dataset.strip()):
        dataset = default_dataset
    elif not isinstance(dataset, str):
        raise RecordError(BAD_DATASET, f"'dataset' is {type(dataset).__name__}")
    rid = obj.get("id")
    if isinstance(rid, bool) or (rid is not None and not isinstance(rid, (str, int))):
        raise RecordError(BAD_ID, f"'id' is {type(rid).__name__}")
    _check_utf8(dataset, "dataset")
    if isinstance(rid, str):
        _check_utf8(rid, "id")
    rid = None if rid is None or (isinstance(rid, str) and not rid.strip()) else str(rid)
    return {"dataset": dataset, "id": rid, "messages": messages}


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    if len(messages) == 0:
        raise RecordError(EMPTY_MESSAGES, "no messages")
    roles = set()
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise RecordError(UNKNOWN_ROLE, f"messages[{i}].role = {role!r}")
        if not isinstance(content, str):
            raise RecordError(NON_STRING_CONTENT, f"messages[{i}].content is {type(content).__name__}")
        if not content.strip():
            raise RecordError(EMPTY_CONTENT, f"messages[{i}] ({role}) has empty content")
        _check_utf8(content, f"messages[{i}].content")
        roles.add(role)
    if "user" not in roles:
        raise RecordError(NO_USER_TURN, "no user turn")
    if "assistant" not in roles:
        raise RecordError(NO_ASSISTANT_TURN, "no assistant turn")


def n_chars(messages: Sequence[Mapping[str, Any]]) -> int:
    """Total characters of all message contents (the over-long measure)."""
    return sum(len(m["content"]) for m in messages)


def _check_utf8(text: str, where: str) -> None:
    # JSON escapes can smuggle lone surrogates ("\\ud800") that no UTF-8 file can hold.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RecordError(NOT_UTF8, f"{where} is not valid Unicode ({exc.reason} at {exc.start})") from None
