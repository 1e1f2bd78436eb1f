"""Which model scores: a Select-MoE selector (gate + routing), another Hugging Face MoE (routing from its
``router_logits``, no gate) or a dense causal LM (Llama, Qwen2, Gemma3, ...: neither).

:func:`scorer_info` tells the driver what the model yields from its config alone (no weights), so the
router data's columns and the report's wording are fixed before a replica starts; :func:`load_scorer`
loads it on a replica.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _config(model_dir: str | Path):
    from transformers import AutoConfig

    import selectmoe.model  # noqa: F401  (registers the Select-MoE Auto classes)
    from selectmoe.model.artifact import selector_model_dir
    from selectmoe.storage import local_copy

    base = local_copy(selector_model_dir(model_dir))  # shared storage: a node-local copy
    if not (Path(base) / "config.json").is_file():
        raise ValueError(f"score.model_dir={model_dir}: no config.json (not a model directory)")
    return AutoConfig.from_pretrained(str(base))


def routed_layers(config) -> int:
    """MoE layers of an HF MoE (Qwen2-MoE may keep some layers dense: ``mlp_only_layers``,
    ``decoder_sparse_step``); every layer otherwise."""
    layers = int(config.num_hidden_layers)
    dense = set(getattr(config, "mlp_only_layers", None) or [])
    step = int(getattr(config, "decoder_sparse_step", 1) or 1)
    return sum(1 for i in range(layers) if i not in dense and (i + 1) % step == 0)


def scorer_info(model_dir: str | Path) -> dict[str, Any]:
    """``{"model_dir", "model_type", "architecture", "kind", "hidden_size", "num_layers", "num_experts",
    "signals"}`` from the config only: ``kind`` as :func:`selectmoe.scoring.model.scorer_kind`;
    ``num_layers``/``num_experts`` shape the routing features (``num_experts`` 0: no routing)."""
    from selectmoe.scoring.model import scorer_kind

    config = _config(model_dir)
    kind = scorer_kind(config)
    experts = int(getattr(config, "num_experts", 0) or getattr(config, "num_local_experts", 0) or 0)
    layers = int(config.num_hidden_layers) if kind == "select_moe" else routed_layers(config)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    signals = ["response_nll", "sample_nll"]
    if kind == "select_moe":
        signals = ["gate", *signals]
    return {
        "model_dir": str(model_dir),
        "model_type": str(getattr(config, "model_type", "")),
        "architecture": ",".join(getattr(config, "architectures", None) or []) or "",
        "kind": kind,
        "hidden_size": int(text_config.hidden_size),
        "num_layers": layers if kind != "dense" else int(config.num_hidden_layers),
        "num_experts": experts if kind != "dense" else 0,
        "signals": signals,
    }


def _is_select_moe(path: Path) -> bool:
    from selectmoe.model.artifact import read_selector_meta

    if read_selector_meta(path) is not None:
        return True
    cfg = path / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == "select_moe"


def load_scorer(model_dir: str | Path, *, dtype, device):
    """``(model, tokenizer)`` in eval mode on ``device``: :func:`selectmoe.model.load_selector` for a
    Select-MoE, else ``AutoModelForCausalLM`` (any HF causal LM, loaded in ``dtype``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selectmoe.storage import local_copy

    root = Path(local_copy(model_dir))  # shared storage: a node-local copy (once per node)
    if _is_select_moe(root):
        from selectmoe.model import load_selector

        model, tokenizer, _ = load_selector(root, dtype=dtype, device=device)
        return model, tokenizer
    if not (root / "config.json").is_file():
        raise ValueError(f"score.model_dir={root}: neither a selector artefact nor a model directory")
    model = AutoModelForCausalLM.from_pretrained(str(root), dtype=dtype).to(device)
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(root))


__all__ = ["load_scorer", "routed_layers", "scorer_info"]
