"""Select-MoE model: config, modeling (Auto-registered), losses, stats, conversion, trainable sets, artefacts.

Heavy submodules (conversion, trainable sets, artefacts) are imported lazily on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import Any

from selectmoe.model.configuration_select_moe import SelectMoeConfig
from selectmoe.model.losses import get_quality_loss, register_quality_loss
from selectmoe.model.modeling_select_moe import (
    SelectMoeCausalLMOutput,
    SelectMoeForCausalLM,
    SelectMoeModel,
    register_trash_expert,
)
from selectmoe.model.stats import router_sample_stats, token_mask_for_scope

_LAZY = {
    "convert_olmoe": "selectmoe.model.convert",
    "ConvertResult": "selectmoe.model.convert",
    "apply_trainable": "selectmoe.model.trainable",
    "export_trainable": "selectmoe.model.trainable",
    "import_trainable": "selectmoe.model.trainable",
    "count_trainable": "selectmoe.model.trainable",
    "TRAINABLE_MODES": "selectmoe.model.trainable",
    "save_selector": "selectmoe.model.artifact",
    "load_selector": "selectmoe.model.artifact",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'selectmoe.model' has no attribute {name!r}")


__all__ = [
    "SelectMoeConfig",
    "SelectMoeForCausalLM",
    "SelectMoeModel",
    "SelectMoeCausalLMOutput",
    "register_quality_loss",
    "get_quality_loss",
    "register_trash_expert",
    "router_sample_stats",
    "token_mask_for_scope",
    *_LAZY,
]
