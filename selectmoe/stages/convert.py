"""Stage ``convert``: OLMoE -> Select-MoE with a quality gate per layer (:mod:`selectmoe.model.convert`)."""

from __future__ import annotations

from selectmoe.config import ConvertConfig
from selectmoe.model.convert import ConvertResult, convert_olmoe
from selectmoe.stages.contract import check_inputs


def run_convert(cfg: ConvertConfig) -> ConvertResult:
    check_inputs("convert", cfg)
    return convert_olmoe(
        cfg.source,
        cfg.output_dir,
        gate_init_mean=cfg.gate_init_mean,
        gate_init_std=cfg.gate_init_std,
        gate_init_bias=cfg.gate_init_bias,
        trash_expert_mode=cfg.trash_expert_mode,
        verify=cfg.verify_logits,
        atol=cfg.verify_atol,
    )


__all__ = ["ConvertResult", "run_convert"]
