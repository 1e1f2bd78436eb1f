"""Config mistakes in one or two lines that name the key: what the CLI prints instead of a traceback.

OmegaConf and PyYAML raise exceptions written for the library's developers (``Key 'lr_typo' not in
'WarmupConfig'`` plus three lines of node types; ``AnyNode is not a ListConfig``; a YAML parser trace
that does not say which override). :func:`explain` turns them into ``unknown key warmup.lr_typo; did you
mean warmup.lr?``. Anything it does not recognise is not a config mistake and keeps its traceback.

Nothing here imports OmegaConf or PyYAML at module level: the CLI imports this module before it knows
whether a config will be loaded at all.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# OmegaConf appends "\n    full_key: ...\n    object_type=..." to its messages; the first line is the reason.
_TYPE_NAMES = {"Float": "a number", "Integer": "an integer", "Boolean": "true or false"}
_CONVERT = re.compile(r"Value '(?P<value>.*)' of type '\w+' could not be converted to (?P<type>\w+)")
_CHOICE = re.compile(r"Invalid value '(?P<value>.*)', expected one of \[(?P<choices>.*)\]")


def nearest_key(key: str, candidates: Iterable[str]) -> str | None:
    """The valid key the user most likely meant, or None.

    The closest by difflib ratio (``k_rnge`` -> ``k_range``); failing that, a key the typo extends at a
    ``_`` boundary (``lr_typo`` -> ``lr``: difflib alone ranks ``lora_dropout`` above ``lr``).
    """
    names = sorted(set(candidates))
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        return close[0]
    extended = [n for n in names if key.startswith(n + "_")]
    return max(extended, key=len) if extended else None


def explain(
    exc: BaseException,
    *,
    source: str | None = None,
    overrides: Sequence[str] = (),
    presets: Sequence[str] = (),
) -> str | None:
    """One or two lines for a config mistake, or None when ``exc`` is not one.

    ``source`` is the config name or file the user gave, ``overrides`` the ``key=value`` tokens (a YAML
    error is traced back to the one that does not parse), ``presets`` the shipped preset names (an unknown
    name gets the nearest one suggested).
    """
    from omegaconf.errors import (
        ConfigAttributeError,
        ConfigKeyError,
        InterpolationResolutionError,
        MissingMandatoryValue,
        OmegaConfBaseException,
        ValidationError,
    )
    from yaml import YAMLError

    if isinstance(exc, (ConfigKeyError, ConfigAttributeError)) and getattr(exc, "full_key", None):
        return _unknown_key(exc)
    if isinstance(exc, MissingMandatoryValue) and getattr(exc, "full_key", None):
        return f"mandatory value {exc.full_key} is not set (`???` in {source or 'the config'}); give {exc.full_key}=..."
    if isinstance(exc, ValidationError) and getattr(exc, "full_key", None):
        return _bad_value(exc, overrides)
    if isinstance(exc, InterpolationResolutionError) and getattr(exc, "full_key", None):
        return f"{exc.full_key}: {_first_line(exc)}"
    if isinstance(exc, YAMLError):
        return _yaml_error(exc, source, overrides)
    if isinstance(exc, OmegaConfBaseException):
        where = getattr(exc, "full_key", None)
        return f"{where}: {_first_line(exc)}" if where else f"config: {_first_line(exc)}"
    if isinstance(exc, FileNotFoundError) and _names_missing_source(exc, source, presets):
        guess = nearest_key(str(source), presets)
        return f"{exc}; did you mean {guess}?" if guess else str(exc)
    return None


def _names_missing_source(exc: FileNotFoundError, source: str | None, presets: Sequence[str]) -> bool:
    """The error is about the config the user named (not a file a stage failed to find)."""
    if source is None or source in presets or Path(source).exists():
        return False
    return repr(str(source)) in str(exc) or str(source) in str(exc)


def _first_line(exc: BaseException) -> str:
    msg = getattr(exc, "msg", None) or str(exc)
    return str(msg).splitlines()[0].strip()


def _keys_beside(exc: Any) -> list[str]:
    """The valid keys of the node the unknown key was looked up in."""
    node = getattr(exc, "parent_node", None)
    if node is not None and hasattr(node, "keys"):
        return [str(k) for k in node]
    fields = getattr(getattr(exc, "object_type", None), "__dataclass_fields__", None)
    return list(fields or ())


def _unknown_key(exc: Any) -> str:
    full_key: str = exc.full_key
    prefix, _, key = full_key.rpartition(".")
    keys = _keys_beside(exc)
    guess = nearest_key(key, keys)
    where = f"{prefix}." if prefix else ""
    if guess:
        return f"unknown key {full_key}; did you mean {where}{guess}?"
    return f"unknown key {full_key}; keys of {prefix or 'the config'}: {', '.join(sorted(keys))}"


def _given_value(key: str, overrides: Sequence[str]) -> str | None:
    """The value the last ``key=value`` override gave ``key`` (what the user typed, before YAML)."""
    values = [t.partition("=")[2] for t in overrides if t.partition("=")[0] == key]
    return values[-1] if values else None


def _bad_value(exc: Any, overrides: Sequence[str]) -> str:
    full_key: str = exc.full_key
    reason = _first_line(exc)
    if m := _CONVERT.match(reason):
        expected = _TYPE_NAMES.get(m["type"], m["type"])
        return f"{full_key}={m['value']}: expected {expected}"
    if m := _CHOICE.match(reason):
        return f"{full_key}={m['value']}: not one of [{m['choices']}]"
    if "is not a ListConfig" in reason:
        value = _given_value(full_key, overrides)
        example = f"[{value}]" if value else "[a,b]"
        return f"{full_key} is a list: write {full_key}={example}"
    if "is not a DictConfig" in reason or "is not a subclass of" in reason:
        return (
            f"{full_key} is a mapping: write {full_key}={{key: value}} or set its sub-keys ({full_key}.x=...)"
        )
    return f"{full_key}: {reason}"


def _yaml_error(exc: Any, source: str | None, overrides: Sequence[str]) -> str:
    from omegaconf import OmegaConf
    from yaml import YAMLError

    problem = getattr(exc, "problem", None) or _first_line(exc)
    for token in overrides:
        try:
            OmegaConf.from_dotlist([token])
        except YAMLError:
            key = token.partition("=")[0]
            return (
                f"{key}: the value in {token!r} is not valid YAML ({problem}); quote it or fix the brackets"
            )
    mark = getattr(exc, "problem_mark", None)
    where = f"{mark.name}:{mark.line + 1}" if mark is not None else (source or "config")
    return f"{where}: invalid YAML ({problem})"
