"""Regular expressions from untrusted text, matched in linear time.

Target patterns (``re:...``) and the patterns of imported PEFT configs (``alpha_pattern``, ``rank_pattern``) come
from files people share. Python's ``re`` backtracks, so ``(.*.*)*Z`` against an ordinary module name never
finishes; RE2 (Google's engine, the ``google-re2`` package) runs in time linear in the input and bounds its
memory, at the price of backreferences and lookaround, which a module path never needs. Patterns are also capped
in length, and every message echoes at most a short prefix of one.
"""

from __future__ import annotations

from collections.abc import Callable

import re2

MAX_PATTERN_CHARS = 1000
_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # the error goes into our message, not onto stderr
_OPTIONS.max_mem = 8 << 20  # bytes of compiled program: far above any module-path pattern


def shown(text: str, limit: int = 60) -> str:
    """``text`` for an error message: quoted, and cut to ``limit`` characters."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def compile_fullmatch(
    pattern: str, what: str = "regex", limit: int | None = MAX_PATTERN_CHARS
) -> Callable[[str], bool]:
    """A predicate: does the whole string match ``pattern``? ValueError for a pattern RE2 cannot run, or one longer
    than ``limit`` (None for patterns peftkit wrote itself, such as a named place's list of paths)."""
    if limit is not None and len(pattern) > limit:
        raise ValueError(f"{what} {shown(pattern)} is longer than {limit} characters")
    try:
        regex = re2.compile(pattern, options=_OPTIONS)
    except re2.error as error:
        message = error.args[0].decode() if error.args and isinstance(error.args[0], bytes) else str(error)
        raise ValueError(
            f"{what} {shown(pattern)} is not a regex peftkit runs: {message} (RE2 syntax: no backreferences or "
            "lookaround, so that matching takes linear time)"
        ) from None
    return lambda text: regex.fullmatch(text) is not None
