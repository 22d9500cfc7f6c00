"""Optimizer parameter groups that honour what each method asks of its parameters.

Some methods train their parameters at different rates or without weight decay: LoRA+ (Hayou et al. 2024) trains B
at ``ratio`` times A's learning rate; a magnitude vector or a gate should not decay towards zero. A method says so
per parameter through :meth:`~peftkit.Adapter.parameter_group`; :func:`parameter_groups` turns an adapted model into
the list of groups a ``torch.optim`` optimizer takes, so that ``peftkit train``, ``AdapterTrainer``, ``peftkit
compare`` and a user's own loop build the same optimizer.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from peftkit.keys import ADAPTER_CONTAINER
from peftkit.lifecycle.attach import require_state
from peftkit.method import ParameterGroup


def parameter_groups(model: nn.Module, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """The trainable parameters of an adapted model as optimizer groups: ``{"params", "lr", "weight_decay"}``.

    Each adapter parameter gets ``lr * lr_scale`` and ``weight_decay`` or 0 as its method's
    :meth:`~peftkit.Adapter.parameter_group` says; composition gates get no decay; every other trainable parameter
    (base modules the spec trains, a new head) gets ``lr`` and ``weight_decay``. Groups are in a fixed order (the
    model's parameter order), so an optimizer state saved from them loads into the same groups again."""
    state = require_state(model)
    chosen: dict[int, ParameterGroup] = {}
    for attached in state.attached:
        for name, parameter in attached.module.named_parameters():
            chosen[id(parameter)] = attached.module.parameter_group(name)
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad or id(parameter) in seen:
            continue
        seen.add(id(parameter))
        group = chosen.get(id(parameter))
        if group is None:  # a gate of a composition rule is an adapter parameter of no method
            group = ParameterGroup(weight_decay=ADAPTER_CONTAINER not in name.split("."))
        key = (lr * group.lr_scale, weight_decay if group.weight_decay else 0.0)
        groups.setdefault(key, []).append(parameter)
    return [{"params": params, "lr": key[0], "weight_decay": key[1]} for key, params in groups.items()]
