"""Per-sample router statistics (scoring features) and the token scope shared with the quality loss."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from selectmoe.data.encoding import IGNORE_INDEX


def token_mask_for_scope(
    attention_mask: torch.Tensor | None, labels: torch.Tensor | None, scope: str
) -> torch.Tensor:
    """Which tokens count for the quality loss and the router statistics, as a ``[B, T]`` BoolTensor.

    - ``"all"``: every non-pad token (``attention_mask == 1``; all tokens when ``attention_mask`` is None).
    - ``"trained"``: tokens that carry a label themselves (``labels != -100``) and are not padding. This is
      **not** shifted: position t counts when token t is a supervised token (e.g. a response token). The LM
      loss uses the shifted pair (hidden state t predicts label t+1); the gate of a token is scored at the
      token's own position, like ``selectmoe.training.loop.quality_token_mask``.
    """
    if scope not in ("all", "trained"):
        raise ValueError(f"quality token scope must be 'all' or 'trained', got {scope!r}")
    if attention_mask is None:
        if labels is None:
            raise ValueError("token_mask_for_scope needs attention_mask or labels")
        base = torch.ones(labels.shape, dtype=torch.bool, device=labels.device)
    else:
        base = attention_mask.bool()
    if scope == "all":
        return base
    if labels is None:
        raise ValueError("quality token scope 'trained' needs labels")
    return base & (labels != IGNORE_INDEX)


def router_sample_stats(
    router_logits: Sequence[Mapping[str, torch.Tensor]], token_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample statistics of one padded batch, fp32 whatever the model dtype.

    Returns ``quality [B]`` (mean over layers of the token-mean of g = sigmoid(quality_score)),
    ``quality_layers [B, L]`` and ``routing [B, L*E]`` (per layer, token-mean of softmax(moe_logits) in fp32,
    flattened layer-major). Only tokens where ``token_mask`` is true count; a sample without any counted
    token gets zeros.
    """
    mask = token_mask.to(torch.float32)
    bsz, seq = mask.shape
    denom = mask.sum(dim=1).clamp_min(1.0)  # [B]
    q_layers, routing = [], []
    for layer in router_logits:
        score = layer["quality_score"].to(device=mask.device, dtype=torch.float32).reshape(bsz, seq)
        g = torch.sigmoid(score)
        q_layers.append((g * mask).sum(dim=1) / denom)
        logits = layer["moe_logits"].to(device=mask.device, dtype=torch.float32)
        probs = torch.softmax(logits, dim=-1).reshape(bsz, seq, -1)
        routing.append((probs * mask.unsqueeze(-1)).sum(dim=1) / denom.unsqueeze(-1))
    quality_layers = torch.stack(q_layers, dim=1)
    return quality_layers.mean(dim=1), quality_layers, torch.cat(routing, dim=1)


__all__ = ["IGNORE_INDEX", "router_sample_stats", "token_mask_for_scope"]
