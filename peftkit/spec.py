"""The declarative spec: which adapters, of which methods, go where.

``{"adapters": {NAME: [ENTRY, ...]}, "trainable": [GLOB, ...]}``. Each ENTRY is validated by the config class of
the method it names, looked up in the registry at validation time, so a plugin validates its own fields and the
core never lists them. Specs arrive from files people share, so they are treated as untrusted: YAML is read with
``safe_load``, unknown fields are refused, and every failure is a :class:`~peftkit.errors.SpecError` that names the
field path and the allowed values.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)
from torch import nn

from peftkit.compose import Composition
from peftkit.errors import PeftkitError, SpecError
from peftkit.method import MethodConfig
from peftkit.patterns import check_patterns
from peftkit.registry import get_method
from peftkit.untrusted import parse_json, parse_yaml

ADAPTER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")  # fullmatch: "$" would accept a trailing newline
# An adapter's name is its key in the host's nn.ModuleDict, so it cannot be one of that container's attributes.
RESERVED_NAMES = frozenset(name for name in dir(nn.ModuleDict()) if ADAPTER_NAME.fullmatch(name))


def adapter_name_problem(name: Any) -> str | None:
    """What is wrong with ``name`` as an adapter name, or None."""
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        return (
            f"adapter name {str(name)[:80]!r} must start with a letter or '_' and hold only letters, digits, '_' "
            "and '-' (at most 64 characters)"
        )
    if name in RESERVED_NAMES:
        return (
            f"adapter name {name!r} is reserved (it is an attribute of the nn.ModuleDict that holds a host's "
            "adapters); choose another name"
        )
    return None


def _cut(text: str, limit: int = 80) -> str:
    """An echo of untrusted input, at most ``limit`` characters of it."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _format_validation_error(error: ValidationError, prefix: str = "") -> str:
    lines = []
    for item in error.errors(include_url=False):
        path = ".".join(str(part) for part in (prefix, *item["loc"]) if part != "")
        message = item["msg"].removeprefix("Value error, ")
        shown = item.get("input")
        got = f" (got {_cut(repr(shown))})" if not isinstance(shown, dict | list) and "input" in item else ""
        lines.append(f"  {path}: {message}{got}" if path else f"  {message}{got}")
    return "invalid spec:\n" + "\n".join(lines)


def _typed_entry(entry: Any, path: str) -> MethodConfig:
    if isinstance(entry, MethodConfig):
        return entry
    if not isinstance(entry, Mapping):
        raise ValueError(f"{path}: an entry must be a mapping with a 'method' key, got {type(entry).__name__}")
    method_name = entry.get("method")
    if not isinstance(method_name, str):
        raise ValueError(f"{path}.method: required, a registered method name (got {method_name!r})")
    try:
        config = get_method(method_name).config
    except PeftkitError as error:
        raise ValueError(f"{path}.method: {error}") from None
    try:
        return config.model_validate(dict(entry))
    except ValidationError as error:
        raise ValueError(_format_validation_error(error, path).removeprefix("invalid spec:\n").strip()) from None


class Spec(BaseModel):
    """Named adapters, each a list of method entries, plus base modules to keep fully trainable."""

    model_config = ConfigDict(extra="forbid")

    adapters: dict[str, list[SerializeAsAny[MethodConfig]]] = Field(min_length=1)
    trainable: list[str] = Field(
        default_factory=list, description="globs of base modules trained in full and saved (e.g. a new head)"
    )
    compose: list[Composition] = Field(
        default_factory=list, description="rules combining several of these adapters where they meet"
    )

    @model_validator(mode="after")
    def _compositions_name_known_adapters(self) -> Spec:
        seen: dict[str, int] = {}
        for index, composition in enumerate(self.compose):
            unknown = [name for name in composition.adapters if name not in self.adapters]
            if unknown:
                raise ValueError(
                    f"compose.{index}: adapters {unknown} are not in this spec; known: {sorted(self.adapters)}"
                )
            for name in composition.adapters:
                if name in seen:
                    raise ValueError(f"compose.{index}: adapter {name!r} is already composed by compose.{seen[name]}")
                seen[name] = index
        return self

    @model_validator(mode="before")
    @classmethod
    def _entries_by_method(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        adapters = data.get("adapters")
        if not isinstance(adapters, Mapping):
            return data
        typed: dict[Any, Any] = {}
        for name, entries in adapters.items():
            problem = adapter_name_problem(name)
            if problem:
                raise ValueError(f"adapters: {problem}")
            if isinstance(entries, Mapping):
                entries = [entries]
            if not isinstance(entries, list) or not entries:
                raise ValueError(f"adapters.{name}: must be a non-empty list of entries")
            typed[name] = [_typed_entry(entry, f"adapters.{name}.{i}") for i, entry in enumerate(entries)]
        return {**data, "adapters": typed}

    @field_validator("trainable")
    @classmethod
    def _trainable_patterns_compile(cls, value: list[str]) -> list[str]:
        return check_patterns(value)

    # -- loading: every path ends in SpecError, never a pydantic or YAML exception -------------------------------
    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Spec:  # type: ignore[override]
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as error:
            raise SpecError(_format_validation_error(error)) from None

    @classmethod
    def model_validate_json(cls, json_data: str | bytes, **kwargs: Any) -> Spec:  # type: ignore[override]
        return cls.model_validate(parse_json(json_data, SpecError, "invalid spec: the text"), **kwargs)

    @classmethod
    def from_yaml(cls, text: str) -> Spec:
        return cls.model_validate(parse_yaml(text, SpecError, "invalid spec: the text"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Spec:
        return cls.model_validate_json(text)

    @classmethod
    def from_file(cls, path: str | Path) -> Spec:
        """Load a ``.yaml``/``.yml`` or ``.json`` file."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in {".yaml", ".yml", ".json"}:
            raise SpecError(f"spec file {str(path)!r}: unknown extension; use .yaml, .yml or .json")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise SpecError(
                f"cannot read spec file {str(path)!r}: {getattr(error, 'strerror', None) or error}"
            ) from None
        return cls.from_json(text) if suffix == ".json" else cls.from_yaml(text)

    @classmethod
    def coerce(cls, spec: Spec | Mapping[str, Any] | str | Path) -> Spec:
        """Accept a Spec, a dict, or a path to a spec file wherever the API takes a spec."""
        if isinstance(spec, Spec):
            return spec
        if isinstance(spec, str | Path):
            return cls.from_file(spec)
        return cls.model_validate(spec)

    # -- dumping: the same form that loads back -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def merged_with(self, other: Spec) -> Spec:
        """This spec plus another's adapters (names must differ) and trainable globs."""
        clash = sorted(set(self.adapters) & set(other.adapters))
        if clash:
            raise SpecError(f"adapter name(s) {clash} already attached; detach them first or pick other names")
        return Spec(
            adapters={**self.adapters, **other.adapters},
            trainable=list(dict.fromkeys([*self.trainable, *other.trainable])),
            compose=[*self.compose, *other.compose],
        )
