"""What peftkit changed on a model: the record that lets every change be undone exactly.

The record lives on the model object itself (``model._peftkit_state``, set with ``object.__setattr__`` so it is not a
submodule), so ``copy.deepcopy(model)`` copies it with the model and the copy's hooks drive the copy's adapters.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from peftkit.errors import AttachError
from peftkit.method import Adapter, Method, MethodConfig
from peftkit.spec import Spec

STATE_ATTRIBUTE = "_peftkit_state"


class Removable(Protocol):
    """A hook handle, or anything else the core installed on a host that one call takes away."""

    def remove(self) -> None: ...


@dataclass
class AttachedAdapter:
    adapter_name: str
    path: str
    method: type[Method]
    config: MethodConfig
    module: Adapter
    entry: int = 0
    site_hooks: list[Any] = field(default_factory=list)


@dataclass
class ModelState:
    """What peftkit changed on a model, so that every change can be undone exactly."""

    spec: Spec
    attached: list[AttachedAdapter] = field(default_factory=list)
    hooks: dict[str, Removable] = field(default_factory=dict)
    original_requires_grad: dict[str, bool] = field(default_factory=dict)
    active: set[str] = field(default_factory=set)
    routing: Any = None  # an activation.Routing while `peftkit.route` is in effect
    # host path -> {parameter name: the shared Parameter} for tied hosts given their own copy by merge(untie=True)
    untied: dict[str, dict[str, nn.Parameter]] = field(default_factory=dict)
    # host path -> (the adapter that rewrote its weight, a CPU copy of the host's original parameters by name)
    originals: dict[str, tuple[str, dict[str, torch.Tensor]]] = field(default_factory=dict)

    def adapters(self, names: str | Iterable[str] | None = None) -> list[AttachedAdapter]:
        if names is None:
            return list(self.attached)
        wanted = {names} if isinstance(names, str) else set(names)  # one name, not its letters
        unknown = wanted - {a.adapter_name for a in self.attached}
        if unknown:
            known = sorted({a.adapter_name for a in self.attached})
            raise AttachError(f"no attached adapter named {sorted(unknown)}; attached: {known}")
        return [a for a in self.attached if a.adapter_name in wanted]

    def entries(self) -> list[list[AttachedAdapter]]:
        """The attached adapters grouped by spec entry (adapter name and entry index), in attach order: the unit a
        method's entry-wide hooks act on (shared state, training hooks, a compact saved form)."""
        groups: dict[tuple[str, int], list[AttachedAdapter]] = {}
        for attached in self.attached:
            groups.setdefault((attached.adapter_name, attached.entry), []).append(attached)
        return list(groups.values())


def get_state(model: nn.Module) -> ModelState | None:
    return getattr(model, STATE_ATTRIBUTE, None)


def require_state(model: nn.Module) -> ModelState:
    state = get_state(model)
    if state is None:
        raise AttachError("this model has no peftkit adapters; call peftkit.attach(model, spec) first")
    return state
