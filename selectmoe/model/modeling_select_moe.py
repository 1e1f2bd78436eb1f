"""Select-MoE: OLMoE with a per-layer quality gate and a trash expert (single model file).

Decoder layer (attention unchanged)::

    h = post_attention_layernorm(x)
    s = quality_gate(h)                  # Linear(d, 1) with bias, raw score [B, T, 1]
    g = sigmoid(s)
    r = mlp.gate(h)                      # stock OLMoE router: raw logits [B*T, E]
    out = x + g * mlp.experts(h, r) + (1 - g) * trash(h)

``mlp`` is the stock ``OlmoeSparseMoeBlock`` (same submodule and tensor names as OLMoE, so conversion is a
1:1 copy plus the ``quality_gate`` tensors). Router output per layer: ``{"quality_score": s [B, T, 1],
"moe_logits": r [B*T, E]}``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.olmoe.modeling_olmoe import (
    OlmoeAttention,
    OlmoeExperts,
    OlmoeRMSNorm,
    OlmoeRotaryEmbedding,
    OlmoeSparseMoeBlock,
    OlmoeTopKRouter,
)
from transformers.utils import ModelOutput

from selectmoe.model import losses as _losses
from selectmoe.model.configuration_select_moe import SelectMoeConfig
from selectmoe.model.stats import token_mask_for_scope

# --------------------------------------------------------------------------------------------- trash expert

TrashFn = Callable[[torch.Tensor], torch.Tensor]
_TRASH_EXPERTS: dict[str, TrashFn] = {}


def register_trash_expert(name: str, fn: TrashFn) -> TrashFn:
    """Register ``fn(h [B, T, d]) -> [B, T, d]`` as a trash expert; use it with ``trash_expert_mode="custom"``
    and ``trash_expert_name=name``."""
    if not callable(fn):
        raise TypeError(f"trash expert {name!r} must be callable")
    _TRASH_EXPERTS[name] = fn
    return fn


def _noise_trash(h: torch.Tensor) -> torch.Tensor:
    """Per-token N(mean(h), std(h)) over the hidden dim (unbiased std + 1e-8), detached."""
    with torch.no_grad():
        mu = h.mean(dim=-1, keepdim=True)
        sigma = h.std(dim=-1, keepdim=True, unbiased=True) + 1e-8
        return (torch.randn_like(h) * sigma + mu).detach()


class SelectMoeTrashExpert(nn.Module):
    """Parameter-free output for the (1 - g) share: ``zero`` | ``noise`` | ``custom`` (registered callable)."""

    def __init__(self, config: SelectMoeConfig):
        super().__init__()
        self.mode = config.trash_expert_mode
        self.name = config.trash_expert_name
        if self.mode == "custom" and not self.name:
            raise ValueError("trash_expert_mode='custom' needs trash_expert_name (see register_trash_expert)")

    def forward(self, h: torch.Tensor) -> torch.Tensor | None:
        if self.mode == "zero":
            return None  # zeros: the layer skips the (1 - g) * 0 term
        if self.mode == "noise":
            return _noise_trash(h)
        fn = _TRASH_EXPERTS.get(self.name)
        if fn is None:
            raise ValueError(
                f"trash expert {self.name!r} is not registered; registered: {sorted(_TRASH_EXPERTS)}"
            )
        out = fn(h)
        if out.shape != h.shape:
            raise ValueError(
                f"trash expert {self.name!r} returned shape {tuple(out.shape)}, expected {tuple(h.shape)}"
            )
        return out


def _no_autocast(x: torch.Tensor):
    """Autocast off for the device of ``x``: the gates and routers compute in their own (fp32) dtype."""
    return torch.autocast(device_type=x.device.type, enabled=False)


class SelectMoeQualityGate(nn.Linear):
    """``Linear(d, 1)`` with bias: the per-token, per-layer quality score s (g = sigmoid(s)).

    Computed in the weight's dtype (fp32: a kept-fp32 module) with autocast off, so a bf16 autocast forward
    (warmup, probe, evaluation) scores exactly as the stored fp32 scores do."""

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size, 1, bias=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        with _no_autocast(h):
            return super().forward(h.to(self.weight.dtype))


class SelectMoeTopKRouter(OlmoeTopKRouter):
    """The stock OLMoE router (same tensors and outputs), computed in its weight's dtype with autocast off:
    under bf16 autocast a plain ``F.linear`` would route in bf16 although the weights are kept fp32."""

    def forward(self, hidden_states: torch.Tensor):
        with _no_autocast(hidden_states):
            return super().forward(hidden_states.to(self.weight.dtype))


# --------------------------------------------------------------------------------------------- layers


class SelectMoeDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: SelectMoeConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = OlmoeAttention(config=config, layer_idx=layer_idx)
        self.mlp = OlmoeSparseMoeBlock(config)
        self.mlp.gate = SelectMoeTopKRouter(config)  # fp32 routing under autocast (same tensor names)
        self.input_layernorm = OlmoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = OlmoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.quality_gate = SelectMoeQualityGate(config.hidden_size)
        self.trash_expert = SelectMoeTrashExpert(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        h = self.post_attention_layernorm(hidden_states)
        bsz, seq, dim = h.shape
        score = self.quality_gate(h)  # [B, T, 1] raw, in the gate's dtype (fp32 kept fp32, autocast off)
        g = torch.sigmoid(score.float()).to(h.dtype)
        flat = h.reshape(-1, dim)
        # the router is kept fp32 beside bf16 experts (model.precision) and routes in its dtype
        router_logits, top_k_weights, top_k_index = self.mlp.gate(flat)
        moe_out = self.mlp.experts(flat, top_k_index, top_k_weights.to(flat.dtype)).reshape(bsz, seq, dim)
        out = residual + g * moe_out
        trash = self.trash_expert(h)
        if trash is not None:
            out = out + (1.0 - g) * trash.to(h.dtype)
        return out, {"quality_score": score, "moe_logits": router_logits}


# --------------------------------------------------------------------------------------------- models


@dataclass
class SelectMoeModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[dict[str, torch.Tensor], ...] | None = None


@dataclass
class SelectMoeCausalLMOutput(ModelOutput):
    """``loss`` = lm_loss + router_aux_loss_coef * (aux_loss + quality_loss_weight * quality_loss).

    ``router_logits``: tuple over layers of ``{"quality_score": [B, T, 1], "moe_logits": [B*T, E]}``."""

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    quality_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[dict[str, torch.Tensor], ...] | None = None


class SelectMoePreTrainedModel(PreTrainedModel):
    config_class = SelectMoeConfig
    config: SelectMoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SelectMoeDecoderLayer"]  # noqa: RUF012
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True
    # quality gates and routers stay fp32 when the rest is cast to bf16 (selectmoe.model.precision applies
    # this on every cast: transformers 5 honours the list only for fp16 loading)
    _keep_in_fp32_modules = ["quality_gate", "mlp.gate"]  # noqa: RUF012
    # ... and load fp32 from the checkpoint when the model is loaded in bf16 (from_pretrained(dtype=bf16)):
    # the loader never makes an fp32 copy of the whole model, and the gates are never rounded
    _keep_in_fp32_modules_strict = ["quality_gate", "mlp.gate"]  # noqa: RUF012
    # the experts are the stock (``@use_experts_implementation``-decorated) OlmoeExperts, so the experts
    # implementation (grouped_mm / eager / ...) is selectable exactly as for OLMoE
    _can_set_experts_implementation_cached_value = True

    def _init_weights(self, module):
        PreTrainedModel._init_weights(self, module)
        if isinstance(module, OlmoeExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=self.config.initializer_range)
            init.normal_(module.down_proj, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, OlmoeTopKRouter):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, SelectMoeQualityGate):
            # the configured init, applied here so post_init never overwrites it (the original's bug)
            init.normal_(
                module.weight, mean=self.config.quality_gate_init_mean, std=self.config.quality_gate_init_std
            )
            init.constant_(module.bias, self.config.quality_gate_init_bias)


class SelectMoeModel(SelectMoePreTrainedModel):
    def __init__(self, config: SelectMoeConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [SelectMoeDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = OlmoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = OlmoeRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> SelectMoeModelOutput:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if cache is None:
            cache = past_key_values
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        kwargs.pop("output_router_logits", None)
        kwargs.pop("output_attentions", None)
        kwargs.pop("return_dict", None)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = (
                torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen
            ).unsqueeze(0)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden = [] if output_hidden_states else None
        router = []
        for layer in self.layers[: self.config.num_hidden_layers]:
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states, router_out = layer(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=causal_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )
            router.append(router_out)
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        return SelectMoeModelOutput(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            router_logits=tuple(router),
        )


class SelectMoeForCausalLM(SelectMoePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # noqa: RUF012

    def __init__(self, config: SelectMoeConfig):
        super().__init__(config)
        self.model = SelectMoeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.router_aux_loss_coef = config.router_aux_loss_coef
        self.num_experts = config.num_experts
        self.num_experts_per_tok = config.num_experts_per_tok
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        *,
        num_items_in_batch=None,
        num_samples_in_batch=None,
        num_quality_tokens_in_batch=None,
        output_router_logits: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> SelectMoeCausalLMOutput:
        """Forward + losses. The ``num_*_in_batch`` counts are global (all micro-batches of an optimizer step,
        all workers); with them, summing micro-batch losses equals the full-batch loss (exact GA)."""
        cfg = self.config
        output_router_logits = (
            output_router_logits if output_router_logits is not None else cfg.output_router_logits
        )
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden)

        loss = lm = q_loss = aux = None
        router = outputs.router_logits
        if labels is not None:
            lm = _losses.lm_loss(logits, labels, num_items_in_batch)
            scope = cfg.quality_token_scope
            qmask = token_mask_for_scope(attention_mask, labels, scope)
            q_loss = _losses.quality_loss(
                [r["quality_score"] for r in router],
                qmask,
                loss_type=cfg.quality_loss_type,
                params=cfg.quality_loss_params,
                sample_wise=cfg.sample_wise_averaging,
                num_samples_in_batch=num_samples_in_batch,
                num_quality_tokens_in_batch=num_quality_tokens_in_batch,
                custom_name=cfg.custom_quality_loss_name,
                debug=cfg.quality_loss_debug,
            )
            extra = cfg.quality_loss_weight * q_loss
            if cfg.enable_load_balancing:
                aux = _losses.load_balancing_loss(
                    [r["moe_logits"] for r in router],
                    self.num_experts,
                    self.num_experts_per_tok,
                    attention_mask,
                )
                share = _losses.batch_share(
                    attention_mask=attention_mask,
                    labels=labels,
                    quality_mask=qmask,
                    sample_wise=cfg.sample_wise_averaging,
                    num_items_in_batch=num_items_in_batch,
                    num_samples_in_batch=num_samples_in_batch,
                    num_quality_tokens_in_batch=num_quality_tokens_in_batch,
                )
                aux = aux * share
                extra = extra + aux
            loss = lm + cfg.router_aux_loss_coef * extra.to(lm.device)
        elif output_router_logits and cfg.enable_load_balancing:
            aux = _losses.load_balancing_loss(
                [r["moe_logits"] for r in router], self.num_experts, self.num_experts_per_tok, attention_mask
            )
        return SelectMoeCausalLMOutput(
            loss=loss,
            lm_loss=lm,
            quality_loss=q_loss,
            aux_loss=aux,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            router_logits=router if (output_router_logits or labels is not None) else None,
        )


def register_auto_classes() -> None:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register("select_moe", SelectMoeConfig, exist_ok=True)
    AutoModel.register(SelectMoeConfig, SelectMoeModel, exist_ok=True)
    AutoModelForCausalLM.register(SelectMoeConfig, SelectMoeForCausalLM, exist_ok=True)


register_auto_classes()

__all__ = [
    "SelectMoeCausalLMOutput",
    "SelectMoeDecoderLayer",
    "SelectMoeForCausalLM",
    "SelectMoeModel",
    "SelectMoePreTrainedModel",
    "SelectMoeQualityGate",
    "SelectMoeTrashExpert",
    "register_auto_classes",
    "register_trash_expert",
]
