"""Parsing text that arrives from files people share: bounded, and every failure a peftkit error.

JSON and YAML parsers recurse once per nesting level, so a few hundred kilobytes of brackets end in a
``RecursionError`` (or a parser that works for minutes); JSON's non-standard ``Infinity`` and ``NaN`` would slip
non-finite numbers into sizes and scales. Everything a spec, a checkpoint's spec.json, a PEFT adapter_config.json or
a training config holds is shallow, so a depth beyond :data:`MAX_DEPTH` is refused instead.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from peftkit.errors import PeftkitError

MAX_DEPTH = 32  # a spec is ~5 levels deep; PEFT's adapter_config.json ~4


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows (non-finite values are refused)")


def parse_json(text: str | bytes, error: type[PeftkitError], what: str) -> Any:
    """``text`` as JSON, or ``error`` naming ``what`` and the problem (bad syntax, Infinity/NaN, too deep)."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise error(f"{what} is nested too deeply (more than {MAX_DEPTH} levels)") from None
    except (ValueError, TypeError, UnicodeDecodeError) as problem:
        raise error(f"{what} is not valid JSON: {problem}") from None
    check_depth(value, error, what)
    return value


def parse_yaml(text: str | bytes, error: type[PeftkitError], what: str) -> Any:
    """``text`` as YAML (``safe_load``: no object construction), or ``error`` naming ``what`` and the problem."""
    try:
        value = yaml.safe_load(text)
    except RecursionError:
        raise error(f"{what} is nested too deeply (more than {MAX_DEPTH} levels)") from None
    except (yaml.YAMLError, UnicodeDecodeError) as problem:
        raise error(f"{what} is not valid YAML: {problem}") from None
    check_depth(value, error, what)
    return value


def check_depth(value: Any, error: type[PeftkitError], what: str) -> None:
    """Refuse containers nested deeper than :data:`MAX_DEPTH`, without recursing (YAML anchors may share nodes)."""
    pending = [(value, 1)]
    seen: set[int] = set()
    while pending:
        node, depth = pending.pop()
        if not isinstance(node, dict | list) or id(node) in seen:
            continue
        if depth > MAX_DEPTH:
            raise error(f"{what} is nested too deeply (more than {MAX_DEPTH} levels)")
        seen.add(id(node))
        children = node.values() if isinstance(node, dict) else node
        pending.extend((child, depth + 1) for child in children)
