"""A training run's identity: the Ray Train run name both stages use.

Ray Train restores the latest checkpoint of a run with the same ``name`` under the same ``storage_path``,
so the name must change whenever anything that defines the trained tensors changes (else a changed config
silently returns the old model), and must not change otherwise (else a crashed run cannot resume). It is
a hash of every training setting, the content fingerprints of the model and the data, and the source of
every selectmoe module the calling stage can run (:func:`selectmoe.code_version.code_version`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import selectmoe

# Settings that say where a run lives or how it is supervised, never what it computes.
BOOKKEEPING_KEYS = frozenset(
    {"output_dir", "storage_path", "resume_from", "max_failures", "train_files", "merge_adapter"}
)


def training_settings(cfg: Any, *, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """A stage config as a plain dict without the bookkeeping keys (and ``exclude``: keys whose content
    enters the identity as a fingerprint instead of a path)."""
    from selectmoe.manifest import jsonable

    plain = jsonable(dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg))
    drop = BOOKKEEPING_KEYS | set(exclude)
    return {k: v for k, v in plain.items() if k not in drop}


def run_name(
    stage: str, settings: Mapping[str, Any], inputs: Mapping[str, Any], *, stage_module: str, **extra: Any
) -> str:
    """``<stage>-<16 hex>``: the hash of ``settings``, the content fingerprints of ``inputs`` (name ->
    path; paths themselves do not count, so a moved directory with the same content resumes), ``extra``
    and the code version of ``stage_module`` (:mod:`selectmoe.code_version`)."""
    from selectmoe.code_version import code_version
    from selectmoe.manifest import config_hash, fingerprint

    contents = {}
    for key, value in inputs.items():
        fp = fingerprint(value) if Path(str(value)).exists() or "://" in str(value) else {"name": str(value)}
        contents[key] = {k: v for k, v in fp.items() if k != "path"}
    identity = {
        "stage": stage,
        "settings": dict(settings),
        "inputs": contents,
        "extra": extra,
        "code": code_version(stage_module),
        "version": selectmoe.__version__,
    }
    return f"{stage}-{config_hash(identity)[:16]}"
