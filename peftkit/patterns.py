"""The pattern language of ``target`` and ``trainable``: globs, ``re:`` regexes on RE2, ``@place`` names found from
a model's structure, and the ``optional:`` prefix. Below the contract: specs and method configs compile their
patterns here at validation, and targeting matches them against a model.
"""

from __future__ import annotations

from collections.abc import Callable
from fnmatch import fnmatchcase

from peftkit.errors import TargetingError
from peftkit.regex import MAX_PATTERN_CHARS, compile_fullmatch, shown
from peftkit.sites.placements import PLACEMENT_NAMES, Places, expand

OPTIONAL_PREFIX = "optional:"


def split_optional(pattern: str) -> tuple[str, bool]:
    """``optional:PATTERN`` -> (PATTERN, True): a pattern that may match nothing on some models."""
    if isinstance(pattern, str) and pattern.startswith(OPTIONAL_PREFIX):
        return pattern[len(OPTIONAL_PREFIX) :], True
    return pattern, False


def compile_pattern(pattern: str, places: Places | None = None) -> Callable[[str], bool]:
    """A predicate over module paths; raises ValueError for an empty pattern or a regex that does not compile.

    ``@name`` stands for a place named in ``placements`` (``@attention_output``...), found on the model of
    ``places``; without a model (validating a spec) it matches nothing. An ``optional:`` prefix is accepted and
    ignored here: whether a pattern may match nothing is the caller's rule (see :func:`resolve_entry`), and an
    optional place that the model lacks matches nothing instead of raising.
    """
    pattern, optional = split_optional(pattern)
    if not isinstance(pattern, str) or not pattern.strip():
        raise ValueError("a target pattern must be a non-empty string")
    if pattern.startswith("@"):
        if pattern[1:] not in PLACEMENT_NAMES:
            raise ValueError(
                f"target {shown(pattern)}: unknown place; places: {', '.join('@' + n for n in PLACEMENT_NAMES)}"
            )
        if places is None:
            return lambda path: False
        try:
            expanded = expand(pattern, places)
        except TargetingError:
            if optional:
                return lambda path: False
            raise
        if expanded.startswith("re:"):  # written by peftkit from the model's own paths: no length cap
            return compile_fullmatch(expanded[3:], f"place {pattern}", limit=None)
        pattern = expanded
    if pattern.startswith("re:"):
        return compile_fullmatch(pattern[3:], "target regex")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"target {shown(pattern)} is longer than {MAX_PATTERN_CHARS} characters")
    return lambda path: fnmatchcase(path, pattern) or fnmatchcase(path, "*." + pattern)


def check_patterns(patterns: list[str]) -> list[str]:
    """Compile each pattern once, without a model, so a bad one is refused when the spec is validated."""
    for pattern in patterns:
        compile_pattern(pattern)
    return patterns
