"""Selector artefact (warmup → score/probe): base-model reference + trainable tensors (safetensors) +
tokenizer. No pickle anywhere.

Layout::

    selector.json         {"base_model_dir", "trainable_mode", "encoding", "model_config_overrides"}
    trainable.safetensors gates + routers under plain SelectMoeForCausalLM names (LoRA merged)
    tokenizer files
"""

from __future__ import annotations

import json
import os
import posixpath
from pathlib import Path
from typing import Any

import torch

from selectmoe import storage

SELECTOR_JSON = "selector.json"
TRAINABLE_FILE = "trainable.safetensors"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def save_selector(
    out_dir,
    *,
    base_model_dir,
    trainable_mode: str,
    tensors: dict[str, torch.Tensor],
    encoding: dict,
    tokenizer,
    config_overrides: dict | None = None,
) -> Path:
    """Write a selector artefact to ``out_dir`` (created); returns its path. ``tokenizer`` is a tokenizer
    object or a directory to copy it from (``None``: the base model's tokenizer is used at load time)."""
    from safetensors.torch import save_file

    from selectmoe.model.trainable import TRAINABLE_MODES

    if trainable_mode not in TRAINABLE_MODES:
        raise ValueError(f"trainable_mode must be one of {TRAINABLE_MODES}, got {trainable_mode!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(clean, str(out / TRAINABLE_FILE), metadata={"format": "pt", "trainable_mode": trainable_mode})
    meta = {
        "base_model_dir": str(base_model_dir)
        if storage.is_uri(base_model_dir)
        else str(Path(base_model_dir).resolve()),
        "trainable_mode": trainable_mode,
        "encoding": dict(encoding or {}),
        "model_config_overrides": dict(config_overrides or {}),
    }
    (out / SELECTOR_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        if isinstance(tokenizer, (str, Path)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        tokenizer.save_pretrained(str(out))
    return out


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).replace("torch.", "")
    aliases = {
        "bf16": "bfloat16",
        "fp16": "float16",
        "half": "float16",
        "fp32": "float32",
        "float": "float32",
    }
    value = getattr(torch, aliases.get(name, name), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return value


def _has_tokenizer(path) -> bool:
    return any(storage.is_file(storage.join(path, f)) for f in _TOKENIZER_FILES)


def _load_select_moe(model_dir: Path, overrides: dict[str, Any], dtype=None):
    """The converted model loaded straight in ``dtype`` (default fp32): safetensors memory-mapped onto a
    meta-initialised model, so the host never holds more than the model in that dtype (the quality gates and
    routers load fp32 from the checkpoint: ``_keep_in_fp32_modules_strict``)."""
    from transformers import AutoConfig

    from selectmoe.model.modeling_select_moe import SelectMoeForCausalLM

    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{model_dir} is not a model directory (no config.json)")
    model_type = json.loads(config_path.read_text()).get("model_type")
    if model_type != "select_moe":
        raise ValueError(
            f"{model_dir} has model_type {model_type!r}, expected 'select_moe' (convert OLMoE first: "
            "selectmoe convert SRC DST)"
        )
    config = AutoConfig.from_pretrained(str(model_dir))
    for key, value in (overrides or {}).items():
        setattr(config, key, value)
    return SelectMoeForCausalLM.from_pretrained(str(model_dir), config=config, dtype=dtype or torch.float32)


def read_selector_meta(path) -> dict[str, Any] | None:
    """``selector.json`` of an artefact with ``base_model_dir`` made absolute; ``None`` for a plain model dir.

    The one reader of the file: the driver gets the encoding, tokenizer and base model without loading
    weights. ``path`` and the base may be URIs (shared storage); a URI base is kept as given."""
    selector_json = storage.join(path, SELECTOR_JSON)
    if not storage.is_file(selector_json):
        return None
    meta = json.loads(storage.read_text(selector_json))
    base = str(meta["base_model_dir"])
    if not storage.is_uri(base) and not os.path.isabs(base):
        if storage.is_uri(path):
            scheme, rest = str(path).split("://", 1)
            base = f"{scheme}://{posixpath.normpath(posixpath.join(rest, base))}"
        else:
            base = str((Path(path) / base).resolve())
    meta["base_model_dir"] = base
    return meta


def selector_model_dir(path) -> str:
    """The directory holding the model's ``config.json``: the base of an artefact, else ``path`` itself
    (a local path or a URI: read it through :func:`selectmoe.storage.local_copy`)."""
    meta = read_selector_meta(path)
    return str(meta["base_model_dir"]) if meta is not None else str(path)


def selector_tokenizer_dir(path) -> str:
    """Where :func:`load_selector` takes the tokenizer from: the artefact when it holds one, else its base
    (a local path or a URI, so a worker on another node stages it itself)."""
    return str(path) if _has_tokenizer(path) else selector_model_dir(path)


def selector_encoding(path) -> dict[str, Any]:
    """The EncodingSpec dict the selector was trained with (``{}`` for a plain converted dir)."""
    meta = read_selector_meta(path)
    return dict((meta or {}).get("encoding") or {})


def load_selector(path, *, dtype=None, device=None):
    """Load a selector artefact (or a plain converted Select-MoE dir) → ``(model, tokenizer, encoding)``.

    The model is loaded directly in ``dtype`` (torch dtype or name; ``None``/``"auto"`` is fp32; the quality
    gates and routers load fp32 whatever it is, so the host peaks at the model's size in ``dtype``), the
    trainable tensors are copied in (a name or shape that does not match the base raises ``ValueError`` naming
    the tensor and shapes), then it is moved to ``device`` and put in eval mode. ``encoding`` is the
    EncodingSpec dict (``{}`` for a plain converted dir).
    """
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from selectmoe.model.precision import cast_model
    from selectmoe.model.trainable import import_trainable

    root = Path(storage.local_copy(path))  # shared storage: a node-local copy (once per node)
    meta = read_selector_meta(path)
    target_dtype = _resolve_dtype(dtype)
    if meta is not None:
        base = Path(storage.local_copy(meta["base_model_dir"]))
        model = _load_select_moe(base, meta.get("model_config_overrides") or {}, target_dtype)
        tensor_file = root / TRAINABLE_FILE
        if tensor_file.is_file():
            tensors = load_file(str(tensor_file))
            try:
                import_trainable(model, tensors)
            except ValueError as err:
                raise ValueError(
                    f"selector {root}: trainable tensors do not match base model {base}: {err}"
                ) from err
        model.selectmoe_trainable_mode = meta.get("trainable_mode", "full_rank")
        tok_dir = root if _has_tokenizer(root) else base
        encoding = dict(meta.get("encoding") or {})
    elif (root / "config.json").is_file():
        model = _load_select_moe(root, {}, target_dtype)
        tok_dir = root
        encoding = {}
    else:
        raise ValueError(f"{root} is neither a selector artefact ({SELECTOR_JSON}) nor a model directory")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    if target_dtype is not None:
        cast_model(model, target_dtype)  # quality gates and routers stay fp32
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer, encoding


__all__ = [
    "SELECTOR_JSON",
    "TRAINABLE_FILE",
    "load_selector",
    "read_selector_meta",
    "save_selector",
    "selector_encoding",
    "selector_model_dir",
    "selector_tokenizer_dir",
]
