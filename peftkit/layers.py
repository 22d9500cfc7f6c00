"""Layer selections: ``3``, ``[0, 1]`` or range strings such as ``"0-3,8"``."""

from __future__ import annotations

import re
from typing import Any

_RANGE = re.compile(r"\s*(\d{1,9})\s*(?:-\s*(\d{1,9})\s*)?")
# No transformer has this many blocks; the bound keeps "0-999999999" from becoming a billion-element list.
MAX_LAYER_INDEX = 65_535


def parse_layers(value: Any) -> Any:
    """Turn a range string or a single int into a sorted list of layer indices; leave other types to pydantic.

    Raises ValueError (which pydantic reports with the field path) for negative indices or malformed ranges.
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        value = [value]
    if isinstance(value, str):
        indices: set[int] = set()
        for part in value.split(","):
            match = _RANGE.fullmatch(part)
            if not match:
                raise ValueError(f"layers {value[:40]!r}: {part[:20]!r} is not an index or a range such as '0-3'")
            start, stop = int(match.group(1)), int(match.group(2) or match.group(1))
            if stop > MAX_LAYER_INDEX:
                raise ValueError(
                    f"layers {value[:40]!r}: index {stop} is beyond {MAX_LAYER_INDEX}, more than any model has"
                )
            if stop < start:
                raise ValueError(f"layers {value!r}: range {part.strip()!r} runs backwards; write '{stop}-{start}'")
            indices.update(range(start, stop + 1))
        return sorted(indices)
    if isinstance(value, list):
        if len(value) > MAX_LAYER_INDEX + 1:
            raise ValueError(f"layers: {len(value)} indices, more than any model has layers")
        for index in value:
            if isinstance(index, int) and not isinstance(index, bool) and index < 0:
                raise ValueError(f"layers: index {index} is negative; layer indices start at 0")
            if isinstance(index, int) and not isinstance(index, bool) and index > MAX_LAYER_INDEX:
                raise ValueError(f"layers: index {index} is beyond {MAX_LAYER_INDEX}, more than any model has")
        return value
    return value
