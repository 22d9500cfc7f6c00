"""Compose adapters that are already attached: the way to fuse adapters trained apart (AdapterFusion's second
stage: load each trained adapter, then learn a fusion over them), or to gate or sum them after the fact.

A spec's own ``compose`` list names adapters of that spec; :func:`add_rule` adds a rule over any attached adapters,
with the same checks (the members' methods must support the rule at every host they share), all or nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from peftkit.compose import Composition, check_rules
from peftkit.errors import AttachError
from peftkit.lifecycle.attach import _add_gates, _restore_dict, _set_training_state
from peftkit.lifecycle.state import require_state
from peftkit.spec import Spec


def add_rule(model: nn.Module, rule: Composition | Mapping[str, Any]) -> nn.Module:
    """Add a composition rule over adapters already attached to ``model`` (``{"rule": "fuse", "adapters": [...]}``):
    the rule's trained numbers are added at each host its members meet (a fusion, gates), the spec that
    ``peftkit.save`` writes gains the rule, and for ``fuse`` the members are frozen so that only the fusion trains.
    Refused, with the model unchanged, when a member is not attached, already composed, or of a method that does
    not support the rule."""
    state = require_state(model)
    written = rule.model_dump() if isinstance(rule, Composition) else dict(rule)
    current = state.spec.to_dict()
    spec = Spec.coerce({**current, "compose": [*current.get("compose", []), written]})  # errors name the field
    rule = spec.compose[-1]
    check_rules([rule], state.attached)
    inputs = sorted(
        {a.adapter_name for a in state.attached if a.adapter_name in rule.adapters and a.module.transforms_input}
    )
    if inputs and rule.rule != "stack":
        raise AttachError(f"add_rule: adapters {inputs} change their host's input, which only 'stack' composes")
    merged = sorted({a.adapter_name for a in state.attached if a.adapter_name in rule.adapters and a.module.merged})
    if merged:
        raise AttachError(f"add_rule: adapters {merged} are merged; unmerge them first")
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    undo: list[Callable[[], None]] = [functools.partial(setattr, state, "spec", state.spec)]
    undo.append(functools.partial(_restore_dict, state.original_requires_grad, dict(state.original_requires_grad)))
    try:
        state.spec = spec
        _add_gates(model, state, len(spec.compose) - 1, undo)
        _set_training_state(model, state)
    except BaseException:
        for step in reversed(undo):
            step()
        for name, parameter in model.named_parameters():
            if name in flags:
                parameter.requires_grad_(flags[name])
        raise
    return model
