"""Per-sample feature vectors from the scoring pass: the pooled last-layer hidden state (``hidden``) and, for
a Hugging Face MoE that is not a Select-MoE, the routing features from its ``router_logits``.

Hidden state (RDS+, Ivison et al. 2025): the *position-weighted* mean of the last layer's hidden states
over the sample's non-pad tokens (token ``t`` of ``n`` weighs ``t / sum(1..n)``: later tokens have read
more of the sample; RDS+'s best pooling, ahead of a uniform mean and of the last token). It is captured
from the input of the LM head (the final-norm output every HF causal LM feeds its ``lm_head``), so it costs
no extra pass and no ``output_hidden_states`` copy of every layer.

Storage: the pooled vector is L2-normalised (selection uses it through cosine similarity only) and, when the
model's hidden size ``H`` exceeds ``score.hidden_dim`` ``D``, projected by a fixed Gaussian random matrix
``R [H, D] ~ N(0, 1/D)`` drawn from a CPU ``torch.Generator`` seeded with :data:`PROJECTION_SEED`
(Johnson-Lindenstrauss: inner products, hence cosines, are kept up to ``O(1/sqrt(D))``; a data-free map, so
every shard, every replica and every later run use the same one, and no fit over the pool is needed). At
OLMoE's ``H = 2048`` the default ``D = 512`` stores 1 KB a row in fp16 instead of 4 KB.
"""

from __future__ import annotations

from collections.abc import Sequence

PROJECTION_SEED = 20240601  # fixed: the projection is part of the router-data format, never re-drawn


def projection_matrix(hidden_size: int, dim: int):
    """The fixed ``[H, D]`` fp32 JL projection (``None`` when ``H <= D``: the vector is stored whole)."""
    import torch

    if hidden_size <= dim:
        return None
    gen = torch.Generator(device="cpu").manual_seed(PROJECTION_SEED)
    return torch.randn(hidden_size, dim, generator=gen, dtype=torch.float32) / float(dim) ** 0.5


def stored_hidden_dim(hidden_size: int, dim: int) -> int:
    return min(int(hidden_size), int(dim))


def pooled_hidden(hidden, attention_mask, projection=None):
    """``hidden [B, T, H]`` (last layer), ``attention_mask [B, T]`` -> fp32 ``[B, D]``: position-weighted
    mean over the non-pad tokens, L2-normalised, then projected (``projection [H, D]`` or None).

    Right padding: token ``t`` (1-based) of a row weighs ``t``; pads weigh 0, so a row pools the same alone
    and inside a padded batch."""
    import torch

    mask = attention_mask.to(torch.float32)
    weights = torch.cumsum(mask, dim=1) * mask  # 1..n on the real tokens
    weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1.0)
    pooled = torch.einsum("bt,bth->bh", weights, hidden.to(torch.float32))
    pooled = pooled / pooled.norm(dim=1, keepdim=True).clamp_min(1e-12)
    if projection is not None:
        pooled = pooled @ projection.to(pooled.device)
    return pooled


def moe_routing(router_logits: Sequence, token_mask):
    """Routing features of an HF MoE (OLMoE, Mixtral, Qwen2-MoE, ...): per MoE layer, the token-mean of
    softmax(router logits) over ``token_mask`` (fp32), flattened layer-major -> ``[B, L*E]`` — the same
    reduction as the Select-MoE's :func:`selectmoe.model.router_sample_stats`."""
    import torch

    mask = token_mask.to(torch.float32)
    bsz, seq = mask.shape
    denom = mask.sum(dim=1).clamp_min(1.0)
    out = []
    for logits in router_logits:
        probs = torch.softmax(logits.to(device=mask.device, dtype=torch.float32), dim=-1).reshape(
            bsz, seq, -1
        )
        out.append((probs * mask.unsqueeze(-1)).sum(dim=1) / denom.unsqueeze(-1))
    return torch.cat(out, dim=1)


__all__ = ["PROJECTION_SEED", "moe_routing", "pooled_hidden", "projection_matrix", "stored_hidden_dim"]
