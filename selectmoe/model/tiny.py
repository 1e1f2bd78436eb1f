"""Tiny models and a byte-level BPE tokenizer for the demo and the tests (CPU, seconds)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

TINY_MOE = dict(
    num_hidden_layers=4,
    num_experts=16,
    num_experts_per_tok=4,
    hidden_size=128,
    intermediate_size=256,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=2048,
)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE trained on ``texts``, wrapped in ``PreTrainedTokenizerFast`` with ``<|endoftext|>`` as
    EOS (and BOS/UNK) and ``<|pad|>`` as pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=int(vocab_size),
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((t for t in texts if t), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
    )


def _token_ids(tokenizer) -> dict:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return dict(
        vocab_size=len(tokenizer), pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, bos_token_id=None
    )


def tiny_olmoe_config(tokenizer, **overrides):
    from transformers import OlmoeConfig

    return OlmoeConfig(**{**TINY_MOE, **_token_ids(tokenizer), **overrides})


def build_tiny_olmoe(tokenizer, *, seed: int = 0, **overrides):
    """A randomly initialised 4-layer, 16-expert (top-4), hidden-128 ``OlmoeForCausalLM`` (fp32)."""
    from transformers import OlmoeForCausalLM

    torch.manual_seed(seed)
    return OlmoeForCausalLM(tiny_olmoe_config(tokenizer, **overrides)).float()


def build_tiny_select_moe(tokenizer, *, seed: int = 0, **overrides):
    """The Select-MoE counterpart of :func:`build_tiny_olmoe` (same shapes, plus quality gates)."""
    from selectmoe.model.configuration_select_moe import SelectMoeConfig
    from selectmoe.model.modeling_select_moe import SelectMoeForCausalLM

    torch.manual_seed(seed)
    return SelectMoeForCausalLM(SelectMoeConfig(**{**TINY_MOE, **_token_ids(tokenizer), **overrides})).float()


def build_tiny_dense_target(tokenizer, *, arch: str = "llama", seed: int = 0):
    """A 2-layer, hidden-128 dense causal LM (``llama`` or ``qwen2``) to fine-tune on the selected data."""
    common = dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        **_token_ids(tokenizer),
    )
    torch.manual_seed(seed)
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(**common)).float()
    if arch == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        return Qwen2ForCausalLM(Qwen2Config(**common)).float()
    raise ValueError(f"unknown dense target arch {arch!r} (expected 'llama' or 'qwen2')")


__all__ = [
    "TINY_MOE",
    "build_tiny_dense_target",
    "build_tiny_olmoe",
    "build_tiny_select_moe",
    "tiny_olmoe_config",
    "train_bpe_tokenizer",
]
