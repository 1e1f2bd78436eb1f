"""THE scoring function: per-sample gate quality, routing / hidden-state features and NLL anchors from one
forward pass, for a Select-MoE, any other Hugging Face MoE or a dense causal LM.

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


# rows of fp32 logits one NLL chunk holds at most (elements): bounds the fp32 copy of bf16 logits
NLL_CHUNK_ELEMENTS = 1 << 27


def mean_token_nll(logits, targets):
    """Per-sample mean next-token NLL (fp32) over positions whose target is not ``IGNORE_INDEX``.

    ``logits [B, T, V]`` predict ``targets [B, T]`` shifted by one (HF causal-LM convention). A row without
    any target gets NaN. Returns fp32 numpy ``[B]``; see :func:`mean_token_nlls`."""
    return mean_token_nlls(logits, [targets])[0]


def mean_token_nlls(logits, targets_list):
    """:func:`mean_token_nll` for several target sets of the same logits (the whole sample and the answer),
    from ONE log-softmax: with a large vocabulary (Gemma-3: 262k words) the normalisation is the cost, and
    taking it on the logits as they are (rows of a contiguous ``[T, V]``) avoids the copy that flattening the
    shifted ``[:, :-1]`` view would make. Vectorised over rows (no host sync per row); rows are taken in
    chunks of at most ``NLL_CHUNK_ELEMENTS`` fp32 logits so a bf16 batch never holds a whole fp32 copy.
    Each position's NLL is the bits ``F.cross_entropy`` gives (the same per-row log-softmax, negated)."""
    import torch

    b, t, v = logits.shape
    masks = []
    for targets in targets_list:
        shifted = targets[:, 1:].to(logits.device)
        keep = shifted != IGNORE_INDEX
        masks.append((shifted.masked_fill(~keep, 0), keep))
    totals = [torch.zeros(b, dtype=torch.float32, device=logits.device) for _ in masks]
    step = max(1, NLL_CHUNK_ELEMENTS // max(1, t * v))
    for i in range(0, b, step):
        logp = torch.log_softmax(logits[i : i + step].to(torch.float32), dim=-1)[:, :-1]
        for total, (safe, keep) in zip(totals, masks):
            nll = -logp.gather(-1, safe[i : i + step, :, None]).squeeze(-1)
            total[i : i + step] = (nll * keep[i : i + step]).sum(dim=1)
    out = []
    for total, (_, keep) in zip(totals, masks):
        count = keep.sum(dim=1)
        mean = torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))
        out.append(mean.cpu().numpy())
    return out


def scorer_kind(config) -> str:
    """``select_moe`` (gate + routing), ``moe`` (an HF MoE: routing, no gate) or ``dense`` (neither)."""
    if getattr(config, "model_type", None) == "select_moe":
        return "select_moe"
    if int(getattr(config, "num_experts", 0) or getattr(config, "num_local_experts", 0) or 0) > 0:
        return "moe"
    return "dense"


def score_batch(
    model,
    input_ids,
    attention_mask,
    labels,
    *,
    scope: str,
    response_labels=None,
    hidden_projection=None,
    hidden: bool = False,
) -> dict[str, np.ndarray]:
    """Per-sample statistics of one padded batch, all from ONE forward pass (the scoring function itself).

    Returns fp32 numpy ``sample_nll [B]`` (mean NLL of every token after the first) and ``response_nll
    [B]`` (mean NLL of the tokens ``response_labels`` marks, i.e. the assistant turns; NaN when
    ``response_labels`` is None or marks nothing); for a Select-MoE ``quality [B]`` (the gate) and
    ``quality_layers [B, L]``; for any MoE ``routing [B, L*E]``; with ``hidden`` the pooled last-layer
    hidden state ``hidden [B, D]`` (:func:`selectmoe.scoring.features.pooled_hidden`, projected by
    ``hidden_projection``). A model without a gate or a router simply has no such key (never a fake
    value). Reductions are fp32 whatever the model dtype; only label/pad-masked tokens count, so a sample
    scores the same alone and inside a right-padded batch. No KV cache (one pass,
    nothing decoded). ``torch.no_grad``, not ``inference_mode``: the probe runs this inside training, on an
    FSDP model whose first forward allocates buffers that later steps update in place (an inference tensor
    refuses that).
    """
    import torch

    from selectmoe.model import router_sample_stats, token_mask_for_scope
    from selectmoe.scoring.features import moe_routing, pooled_hidden

    kind = scorer_kind(model.config)
    captured: dict[str, Any] = {}
    handle = None
    if hidden:  # the LM head's input is the final-norm last hidden state, in every HF causal LM
        handle = model.get_output_embeddings().register_forward_pre_hook(
            lambda _module, args: captured.__setitem__("h", args[0])
        )
    try:
        with torch.no_grad():
            kwargs = {"output_router_logits": True} if kind != "dense" else {}
            kwargs["use_cache"] = False
            out = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            stats: dict[str, np.ndarray] = {}
            mask = token_mask_for_scope(attention_mask, labels, scope)
            if kind == "select_moe":
                quality, quality_layers, routing = router_sample_stats(out.router_logits, mask)
                stats["quality"] = quality.float().cpu().numpy()
                stats["quality_layers"] = quality_layers.float().cpu().numpy()
                stats["routing"] = routing.float().cpu().numpy()
            elif kind == "moe":
                stats["routing"] = moe_routing(out.router_logits, mask).cpu().numpy()
            if hidden:
                stats["hidden"] = (
                    pooled_hidden(captured["h"], attention_mask, hidden_projection).cpu().numpy()
                )
            sample_targets = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
            if response_labels is not None:
                stats["sample_nll"], stats["response_nll"] = mean_token_nlls(
                    out.logits, [sample_targets, response_labels]
                )
            else:
                stats["sample_nll"] = mean_token_nll(out.logits, sample_targets)
                stats["response_nll"] = np.full(input_ids.shape[0], np.nan, np.float32)
    finally:
        if handle is not None:
            handle.remove()
    return stats


def length_groups(lengths: Sequence[int], *, min_rows: int = 8, max_ratio: float = 1.25) -> list[np.ndarray]:
    """Row indices sorted by length, cut into groups that pad little: a group closes once it holds
    ``min_rows`` rows and the next row is more than ``max_ratio`` times its shortest."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    groups: list[list[int]] = []
    for k in order:
        n = int(lengths[k])
        if groups and (len(groups[-1]) < min_rows or n <= max_ratio * max(1, int(lengths[groups[-1][0]]))):
            groups[-1].append(int(k))
        else:
            groups.append([int(k)])
    return [np.asarray(g) for g in groups]


def answer_only_nll(model, input_ids, attention_mask, labels) -> np.ndarray:
    """L(A): the response's mean NLL with the question left out (the IFD denominator; one more pass).

    The rows (right-padded) run sorted by length in groups of similar length, each trimmed to its longest
    row, so short answers do not pay for the longest; the result is in the input's row order."""
    import torch

    lengths = attention_mask.sum(dim=1).tolist()
    out = np.full(input_ids.shape[0], np.nan, dtype=np.float32)
    with torch.no_grad():
        for group in length_groups(lengths):
            width = max(1, max(int(lengths[k]) for k in group))
            idx = torch.as_tensor(group, device=input_ids.device)
            logits = model(
                input_ids=input_ids[idx, :width], attention_mask=attention_mask[idx, :width], use_cache=False
            ).logits
            out[group] = mean_token_nll(logits, labels[idx, :width])
    return out


def assistant_only(messages: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The conversation without its question: only the assistant turns (IFD's L(A))."""
    return [m for m in messages if m.get("role") == "assistant"]


def response_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The EncodingSpec whose labels mark the response (assistant) tokens; same text, same tokens."""
    return {**dict(spec), "label_mode": "assistant_only"}
