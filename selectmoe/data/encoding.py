"""THE chat encoder: one template and one label rule for warmup, scoring and finetuning.

Template (the LESS/Tulu plain-text template; the tags are ordinary text, not added tokens)::

    <|system|>\\n{content}\\n
    <|user|>\\n{content}\\n
    <|assistant|>\\n{content}{eos}\\n

``{content}`` is the message content stripped of surrounding whitespace; ``{eos}`` is
``tokenizer.eos_token`` (the empty string when the tokenizer has none).

Labels are derived from *character* spans of the rendered text mapped onto tokens through the fast
tokenizer's ``offset_mapping`` -- never by re-tokenising prefixes or searching token sub-sequences, so
they are right whether or not the tokenizer prepends a BOS (or appends anything) in its post-processor.

Label modes:

- ``full_sequence``: labels = input_ids (every token, tokenizer-added specials included; pads are
  excluded later by :func:`pad_batch`).
- ``full_sequence_mask_tags``: every token except the tag lines (``<|system|>\\n``, ``<|user|>\\n``,
  ``<|assistant|>\\n`` -- the tag *and* its newline) and tokens the tokenizer itself added (BOS etc.).
  Content, EOS and the newline closing each message are trained.
- ``assistant_only``: only assistant content + the EOS after it (SFT).

Boundary rule: a token is labelled iff it is not a tokenizer-added special token and its character span
lies entirely inside labelled characters. A token straddling a labelled/masked boundary is masked (we
never train on template text). Byte-level BPE tokenizers trim whitespace from offsets, so a
whitespace-only token may come back with an empty span ``(p, p)``; it is treated as covering the
character just before ``p``.

Truncation keeps the first ``max_length`` tokens and sets ``truncated=True``; nothing is dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

IGNORE_INDEX = -100
LABEL_MODES = ("full_sequence", "full_sequence_mask_tags", "assistant_only")
ROLE_TAGS = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}


@dataclass(frozen=True)
class EncodingSpec:
    """How a conversation becomes ``input_ids``/``labels``; stored in the selector artefact."""

    max_length: int = 1024
    label_mode: str = "full_sequence_mask_tags"

    def __post_init__(self) -> None:
        if self.label_mode not in LABEL_MODES:
            raise ValueError(f"unknown label_mode {self.label_mode!r}; expected one of {LABEL_MODES}")
        if int(self.max_length) <= 0:
            raise ValueError(f"max_length must be positive, got {self.max_length}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | EncodingSpec | None) -> EncodingSpec:
        if d is None:
            return cls()
        if isinstance(d, EncodingSpec):
            return d
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(d).items() if k in known})


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    full_tokens: int = 0  # the sample's length before truncation (== n_tokens when not truncated)

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


class ChatEncoder:
    """Render + tokenize + label a list of ``{"role", "content"}`` messages.

    ``tokenizer`` must be a fast (Rust-backed) Hugging Face tokenizer: offsets are required.
    """

    def __init__(self, tokenizer: Any, spec: EncodingSpec | Mapping[str, Any] | None = None):
        self.tokenizer = tokenizer
        self.spec = EncodingSpec.from_dict(spec)
        self.eos = tokenizer.eos_token or ""

    # ----------------------------------------------------------------- rendering
    def render_with_spans(self, messages: Sequence[Mapping[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the sorted, disjoint character spans that carry labels."""
        parts: list[str] = []
        spans: list[tuple[int, int]] = []
        pos = 0
        mode = self.spec.label_mode
        for m in messages:
            role = m["role"]
            if role not in ROLE_TAGS:
                raise ValueError(f"unknown role {role!r}")
            tag = ROLE_TAGS[role]
            content = str(m["content"]).strip()
            eos = self.eos if role == "assistant" else ""
            piece = f"{tag}{content}{eos}\n"
            c0 = pos + len(tag)
            if mode == "assistant_only":
                if role == "assistant":
                    spans.append((c0, c0 + len(content) + len(eos)))
            else:  # full_sequence_mask_tags (full_sequence ignores spans)
                spans.append((c0, pos + len(piece)))
            parts.append(piece)
            pos += len(piece)
        return "".join(parts), spans

    def render(self, messages: Sequence[Mapping[str, Any]]) -> str:
        return self.render_with_spans(messages)[0]

    # ----------------------------------------------------------------- encoding
    def encode(self, messages: Sequence[Mapping[str, Any]]) -> Encoded:
        return self.encode_many([messages])[0]

    def encode_many(self, conversations: Sequence[Sequence[Mapping[str, Any]]]) -> list[Encoded]:
        """Batch version of :meth:`encode` (one tokenizer call for the whole batch)."""
        if not conversations:
            return []
        rendered = [self.render_with_spans(msgs) for msgs in conversations]
        enc = self.tokenizer(
            [text for text, _ in rendered],
            add_special_tokens=True,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
            truncation=False,
        )
        out = []
        for i, (_, spans) in enumerate(rendered):
            ids = [int(t) for t in enc["input_ids"][i]]
            labels = self._labels(ids, enc["offset_mapping"][i], enc["special_tokens_mask"][i], spans)
            full = len(ids)
            truncated = full > self.spec.max_length
            if truncated:
                ids, labels = ids[: self.spec.max_length], labels[: self.spec.max_length]
            out.append(Encoded(input_ids=ids, labels=labels, truncated=truncated, full_tokens=full))
        return out

    def _labels(
        self,
        ids: list[int],
        offsets: Sequence[Sequence[int]],
        special: Sequence[int],
        spans: list[tuple[int, int]],
    ) -> list[int]:
        if self.spec.label_mode == "full_sequence":
            return list(ids)
        labels = [IGNORE_INDEX] * len(ids)
        j = 0  # spans and token offsets are both non-decreasing: one merge pass
        for k, (tid, (s, e), sp) in enumerate(zip(ids, offsets, special)):
            if sp:
                continue
            if e <= s:  # whitespace-only token whose offsets were trimmed away
                if s == 0:
                    continue
                s, e = s - 1, s
            while j < len(spans) and spans[j][1] <= s:
                j += 1
            if j < len(spans) and spans[j][0] <= s and e <= spans[j][1]:
                labels[k] = tid
        return labels


def _list_array(values: Any) -> pa.ListArray:
    """An Arrow ``list<int64>`` array of ``values`` (an Arrow list column, or a sequence of int sequences)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if not isinstance(values, pa.Array):
        values = pa.array([np.asarray(v, dtype=np.int64) for v in values], type=pa.list_(pa.int64()))
    return values


def pad_lists(values: Any, pad_value: int) -> np.ndarray:
    """Right-pad a ``list<int>`` column into an int64 ``[B, T]`` matrix (vectorised, no Python loop)."""
    values = _list_array(values)
    lengths = np.diff(values.offsets.to_numpy())
    flat = values.flatten().to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    width = int(lengths.max()) if len(lengths) else 0
    out = np.full((len(lengths), width), pad_value, dtype=np.int64)
    out[np.arange(width)[None, :] < lengths[:, None]] = flat  # row-major fill == concatenation order
    return out


def pad_columns(input_ids: Any, labels: Any, pad_token_id: int | None) -> dict[str, Any]:
    """THE padding (training, scoring, probe): right-pad ``input_ids``/``labels`` columns (Arrow list
    columns or sequences of int sequences) into LongTensors ``input_ids``, ``attention_mask``, ``labels``
    (``IGNORE_INDEX`` on pads)."""
    import torch

    if pad_token_id is None:
        raise ValueError("padding needs a pad_token_id (set tokenizer.pad_token)")
    ids, lab = _list_array(input_ids), _list_array(labels)
    id_lens, lab_lens = np.diff(ids.offsets.to_numpy()), np.diff(lab.offsets.to_numpy())
    if len(id_lens) != len(lab_lens):
        raise ValueError(f"{len(id_lens)} input_ids rows but {len(lab_lens)} labels rows")
    bad = np.flatnonzero(id_lens != lab_lens)
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"item {i}: {id_lens[i]} input_ids but {lab_lens[i]} labels")
    padded = torch.from_numpy(pad_lists(ids, int(pad_token_id)))
    attention = torch.from_numpy((np.arange(padded.shape[1])[None, :] < id_lens[:, None]).astype(np.int64))
    return {
        "input_ids": padded,
        "attention_mask": attention,
        "labels": torch.from_numpy(pad_lists(lab, IGNORE_INDEX)),
    }


def pad_batch(items: Sequence[Encoded | Mapping[str, Any]], pad_token_id: int | None) -> dict[str, Any]:
    """:func:`pad_columns` of encoded items (``Encoded`` or mappings; missing ``labels`` = the input_ids)."""
    ids = [it.input_ids if isinstance(it, Encoded) else it["input_ids"] for it in items]
    labels = [
        it.labels
        if isinstance(it, Encoded)
        else (it["input_ids"] if it.get("labels") is None else it["labels"])
        for it in items
    ]
    return pad_columns(ids, labels, pad_token_id)
