"""Select-MoE configuration: OLMoE plus a per-layer quality gate, trash expert and quality-loss settings."""

from __future__ import annotations

from dataclasses import field
from typing import Any

from transformers.models.olmoe.configuration_olmoe import OlmoeConfig

TRASH_MODES = ("zero", "noise", "custom")
TOKEN_SCOPES = ("all", "trained")


class SelectMoeConfig(OlmoeConfig):
    """``OlmoeConfig`` + Select-MoE extras.

    - ``quality_gate_init_mean/std/bias``: init of each layer's ``quality_gate = Linear(d, 1)``; applied in
      ``_init_weights`` so ``post_init`` never overwrites it (bias 4.0 → g = 0.982 ≈ function preserving).
    - ``trash_expert_mode``: ``zero`` | ``noise`` | ``custom`` (``trash_expert_name`` names a callable
      registered with :func:`selectmoe.model.register_trash_expert`).
    - ``quality_loss_type``: a name in the quality-loss registry (``sigmoid``, ``mse``,
      ``beta_moment_matching``, ``mean_variance_regularization``, ``custom`` or any registered name);
      ``custom`` resolves to the callable registered under ``custom_quality_loss_name``.
    - ``quality_loss_weight`` (w_q), ``quality_loss_params`` (floats: target_mean, target_var, w_mean, w_var,
      lambda_var), ``sample_wise_averaging``, ``enable_load_balancing``.
    - ``quality_token_scope``: ``all`` (non-pad tokens) | ``trained`` (label tokens) — shared by the quality
      loss and the router statistics of scoring.
    - ``quality_loss_debug``: log per-layer loss terms and gate statistics via ``logging``.

    Total loss: ``L = L_LM + router_aux_loss_coef * (L_LB + quality_loss_weight * L_Q)``.
    """

    model_type = "select_moe"

    quality_gate_init_mean: float = 0.0
    quality_gate_init_std: float = 0.02
    quality_gate_init_bias: float = 4.0
    trash_expert_mode: str = "zero"
    trash_expert_name: str | None = None
    quality_loss_type: str = "sigmoid"
    custom_quality_loss_name: str = "custom"
    quality_loss_weight: float = 1.0
    quality_loss_params: dict[str, Any] = field(default_factory=dict)
    sample_wise_averaging: bool = True
    enable_load_balancing: bool = False
    quality_token_scope: str = "all"
    quality_loss_debug: bool = False

    def __post_init__(self, **kwargs):
        kwargs.pop("model_type", None)  # an OLMoE config dict passed through must not relabel the class
        if self.quality_loss_params is None:
            self.quality_loss_params = {}
        if self.trash_expert_mode not in TRASH_MODES:
            raise ValueError(
                f"trash_expert_mode must be one of {TRASH_MODES}, got {self.trash_expert_mode!r}"
            )
        if self.quality_token_scope not in TOKEN_SCOPES:
            raise ValueError(
                f"quality_token_scope must be one of {TOKEN_SCOPES}, got {self.quality_token_scope!r}"
            )
        super().__post_init__(**kwargs)


__all__ = ["TOKEN_SCOPES", "TRASH_MODES", "SelectMoeConfig"]
