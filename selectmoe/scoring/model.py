"""THE scoring function: per-sample gate quality, routing features and NLL anchors from one forward pass.

Used by the score stage's replicas (:mod:`selectmoe.scoring.scorer`) and the quality probe
(:mod:`selectmoe.scoring.probe`), so a stored score and a probe score are the same number.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from selectmoe.data.encoding import IGNORE_INDEX


def resolve_dtype(name: str, use_gpu: bool):
    import torch

    if name == "auto":
        return torch.bfloat16 if use_gpu else torch.float32
    if name in ("bfloat16", "bf16"):
        return torch.bfloat16
    if name in ("float32", "fp32"):
        return torch.float32
    raise ValueError(f"score.dtype must be auto | bfloat16 | float32, got {name!r}")


def mean_token_nll(logits, targets) -> np.ndarray:
    """Per-sample mean next-token NLL (fp32) over positions whose target is not ``IGNORE_INDEX``.

    ``logits [B, T, V]`` predict ``targets [B, T]`` shifted by one (HF causal-LM convention). Row by row in
    fp32 so memory stays ``T x V`` beyond the logits themselves; a row without any target gets NaN."""
    import torch
    import torch.nn.functional as F

    out = np.full(logits.shape[0], np.nan, dtype=np.float32)
    shifted = targets[:, 1:]
    for i in range(logits.shape[0]):
        tgt = shifted[i]
        keep = tgt != IGNORE_INDEX
        if bool(keep.any()):
            row = logits[i, :-1][keep].to(torch.float32)
            out[i] = float(F.cross_entropy(row, tgt[keep].to(row.device), reduction="mean"))
    return out


def score_batch(
    model, input_ids, attention_mask, labels, *, scope: str, response_labels=None
) -> dict[str, np.ndarray]:
    """Per-sample statistics of one padded batch, all from ONE forward pass (the scoring function itself).

    Returns fp32 numpy ``quality [B]`` (the gate), ``quality_layers [B, L]``, ``routing [B, L*E]``,
    ``sample_nll [B]`` (mean NLL of every token after the first) and ``response_nll [B]`` (mean NLL of the
    tokens ``response_labels`` marks, i.e. the assistant turns; NaN when ``response_labels`` is None or
    marks nothing). Reductions are fp32 whatever the model dtype; only label/pad-masked tokens count, so a
    sample scores the same alone and inside a right-padded batch.
    """
    import torch

    from selectmoe.model import router_sample_stats, token_mask_for_scope

    with torch.inference_mode():
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True)
        mask = token_mask_for_scope(attention_mask, labels, scope)
        quality, quality_layers, routing = router_sample_stats(out.router_logits, mask)
        sample_targets = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        sample_nll = mean_token_nll(out.logits, sample_targets)
        response_nll = (
            mean_token_nll(out.logits, response_labels)
            if response_labels is not None
            else np.full(input_ids.shape[0], np.nan, np.float32)
        )
    return {
        "quality": quality.float().cpu().numpy(),
        "quality_layers": quality_layers.float().cpu().numpy(),
        "routing": routing.float().cpu().numpy(),
        "sample_nll": sample_nll,
        "response_nll": response_nll,
    }


def answer_only_nll(model, input_ids, attention_mask, labels) -> np.ndarray:
    """L(A): the response's mean NLL with the question left out (the IFD denominator; one more pass)."""
    import torch

    with torch.inference_mode():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        return mean_token_nll(logits, labels)


def assistant_only(messages: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The conversation without its question: only the assistant turns (IFD's L(A))."""
    return [m for m in messages if m.get("role") == "assistant"]


def response_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The EncodingSpec whose labels mark the response (assistant) tokens; same text, same tokens."""
    return {**dict(spec), "label_mode": "assistant_only"}
