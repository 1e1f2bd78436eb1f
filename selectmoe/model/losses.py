"""Select-MoE losses: LM loss, the quality-loss registry, load balancing, and GA-exact normalisation.

A quality loss is ``fn(g, mask, params) -> Tensor`` with ``g`` the fp32 per-token gate value ``[B, T]``,
``mask`` the ``[B, T]`` BoolTensor of counted tokens (``token_mask_for_scope``) and ``params`` the config's
``quality_loss_params`` dict. It returns either

- a per-token term ``u`` shaped like ``g``; the framework masks and averages it (sample-wise: mean per
  sample, summed and divided by ``num_samples_in_batch``; token-wise: summed and divided by
  ``num_quality_tokens_in_batch``). With global counts, summing micro-batch losses gives exactly the
  full-batch loss (exact gradient accumulation);
- or a 0-dim batch-level loss (moment matching); it is weighted by the micro-batch's share of the global
  count (samples or quality tokens), so GA reproduces the count-weighted mean of micro-batch losses (batch
  moments themselves are not decomposable, so these losses are exact only without GA).

Every loss keeps its autograd graph. Per-layer losses are averaged over layers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from selectmoe.model.stats import IGNORE_INDEX

logger = logging.getLogger(__name__)

QualityLossFn = Callable[[torch.Tensor, torch.Tensor, Mapping[str, Any]], torch.Tensor]
_QUALITY_LOSSES: dict[str, QualityLossFn] = {}


def register_quality_loss(name: str, fn: QualityLossFn) -> QualityLossFn:
    """Register (or replace) a quality loss under ``name``; select it with ``quality_loss_type=name`` (or
    ``quality_loss_type="custom"`` + ``custom_quality_loss_name=name``). Returns ``fn`` (usable as decorator
    target)."""
    if not callable(fn):
        raise TypeError(f"quality loss {name!r} must be callable")
    _QUALITY_LOSSES[name] = fn
    return fn


def get_quality_loss(name: str, *, custom_name: str = "custom") -> QualityLossFn:
    key = custom_name if name == "custom" else name
    if key not in _QUALITY_LOSSES:
        hint = " (register one with selectmoe.model.register_quality_loss)" if name == "custom" else ""
        raise ValueError(f"unknown quality loss {key!r}{hint}; registered: {sorted(_QUALITY_LOSSES)}")
    return _QUALITY_LOSSES[key]


def _masked_moments(g: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = mask.to(g.dtype)
    n = m.sum()
    mean = (g * m).sum() / n.clamp_min(1.0)
    var = (((g - mean) ** 2) * m).sum() / (n - 1.0).clamp_min(1.0)  # unbiased
    return mean, var


def _sigmoid_loss(g, mask, params):
    return g


def _mse_loss(g, mask, params):
    return g * g


def _beta_moment_matching(g, mask, params):
    mean, var = _masked_moments(g, mask)
    mu = float(params.get("target_mean", 0.5))
    v = float(params.get("target_var", 0.05))
    return (
        float(params.get("w_mean", 1.0)) * (mean - mu) ** 2 + float(params.get("w_var", 1.0)) * (var - v) ** 2
    )


def _mean_variance_regularization(g, mask, params):
    mean, var = _masked_moments(g, mask)
    return (mean - 0.5) ** 2 - float(params.get("lambda_var", 0.1)) * var


register_quality_loss("sigmoid", _sigmoid_loss)
register_quality_loss("mse", _mse_loss)
register_quality_loss("beta_moment_matching", _beta_moment_matching)
register_quality_loss("mean_variance_regularization", _mean_variance_regularization)


def _as_float(x) -> float | None:
    if x is None:
        return None
    return float(x.item() if torch.is_tensor(x) else x)


def quality_loss(
    quality_scores: Sequence[torch.Tensor],
    mask: torch.Tensor,
    *,
    loss_type: str = "sigmoid",
    params: Mapping[str, Any] | None = None,
    sample_wise: bool = True,
    num_samples_in_batch=None,
    num_quality_tokens_in_batch=None,
    custom_name: str = "custom",
    debug: bool = False,
) -> torch.Tensor:
    """L_Q: mean over layers of the masked, count-normalised per-layer loss (see module docstring)."""
    fn = get_quality_loss(loss_type, custom_name=custom_name)
    params = dict(params or {})
    mask = mask.bool()
    m = mask.to(torch.float32)
    per_sample_n = m.sum(dim=1)  # [B]
    local_samples = (per_sample_n > 0).to(torch.float32).sum()
    local_tokens = m.sum()
    n_samples = _as_float(num_samples_in_batch)
    n_tokens = _as_float(num_quality_tokens_in_batch)
    layer_losses = []
    for i, s in enumerate(quality_scores):
        g = torch.sigmoid(s.float().reshape(mask.shape))
        u = fn(g, mask, params)
        if u.dim() == 0:  # batch-level loss: weight by this micro-batch's share of the global count
            if sample_wise:
                share = local_samples / (n_samples if n_samples else local_samples.clamp_min(1.0))
            else:
                share = local_tokens / (n_tokens if n_tokens else local_tokens.clamp_min(1.0))
            loss = u * share
        elif sample_wise:
            per_sample = (u * m).sum(dim=1) / per_sample_n.clamp_min(1.0)
            loss = per_sample.sum() / (n_samples if n_samples else local_samples.clamp_min(1.0))
        else:
            loss = (u * m).sum() / (n_tokens if n_tokens else local_tokens.clamp_min(1.0))
        layer_losses.append(loss)
        if debug:
            with torch.no_grad():
                gv = g[mask] if bool(mask.any()) else g.reshape(-1)
                logger.info(
                    "quality_loss layer=%d type=%s loss=%.6g g_mean=%.4f g_std=%.4f g_min=%.4f g_max=%.4f n=%d",
                    i, loss_type, float(loss.detach()), float(gv.mean()), float(gv.std()) if gv.numel() > 1 else 0.0,
                    float(gv.min()), float(gv.max()), int(gv.numel()),
                )  # fmt: skip
    total = torch.stack(layer_losses).mean()
    if debug:
        logger.info("quality_loss total=%.6g layers=%d", float(total.detach()), len(layer_losses))
    return total


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Causal LM cross-entropy (shifted): sum of token CE / ``num_items_in_batch`` when given, else mean."""
    shift_logits = logits[:, :-1, :].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    if num_items_in_batch is None:
        n = (shift_labels != IGNORE_INDEX).sum().clamp_min(1)
    else:
        n = num_items_in_batch
        if torch.is_tensor(n):
            n = n.to(total.device)
    return total / n


def load_balancing_loss(
    moe_logits: Sequence[torch.Tensor], num_experts: int, top_k: int, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """OLMoE's Switch-style load-balancing loss over all layers (a *tuple* of per-layer logits, so it is
    really computed — the original passed a list and always got 0)."""
    from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

    out = load_balancing_loss_func(tuple(moe_logits), num_experts, top_k, attention_mask)
    if not torch.is_tensor(out):
        raise RuntimeError("load_balancing_loss_func returned a non-tensor: router logits were not a tuple")
    return out


def batch_share(
    *,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    quality_mask: torch.Tensor,
    sample_wise: bool,
    num_items_in_batch=None,
    num_samples_in_batch=None,
    num_quality_tokens_in_batch=None,
) -> torch.Tensor | float:
    """This micro-batch's share of the optimizer step, used to weight batch-level terms (load balancing)
    so that summing micro-batch losses under GA does not multiply them by the number of micro-batches."""
    if sample_wise and num_samples_in_batch is not None:
        return (quality_mask.any(dim=1)).to(torch.float32).sum() / _as_float(num_samples_in_batch)
    if num_quality_tokens_in_batch is not None:
        return quality_mask.to(torch.float32).sum() / _as_float(num_quality_tokens_in_batch)
    if num_items_in_batch is not None and labels is not None:
        return (labels[:, 1:] != IGNORE_INDEX).to(torch.float32).sum() / _as_float(num_items_in_batch)
    return 1.0


__all__ = [
    "batch_share",
    "get_quality_loss",
    "lm_loss",
    "load_balancing_loss",
    "quality_loss",
    "register_quality_loss",
]
