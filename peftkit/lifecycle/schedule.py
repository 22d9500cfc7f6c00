"""What a method adds to training beyond its parameters: a term of the loss, an action between optimizer steps, and
a schedule that must fit the run (AdaLoRA's orthogonality regulariser, its rank allocation, its budget schedule).

A training loop calls three functions, whatever methods are attached:

    peftkit.check_schedule(spec_or_model, total_steps)      # before training (before attaching, where it can)
    loss = loss + peftkit.regularization(model)              # each step, before backward
    peftkit.after_optimizer_step(model, step, total_steps)   # after optimizer.step(), before zero_grad()

``peftkit train``, ``peftkit.AdapterTrainer`` and ``peftkit compare`` do. Each goes to the methods' class methods
(``Method.schedule_refusal``, ``Method.training_loss``, ``Method.after_optimizer_step``) once per spec entry, with
the entry's configuration and its adapters; a method without them costs nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.errors import SpecError
from peftkit.lifecycle.state import get_state
from peftkit.method import Adapter, Method, MethodConfig
from peftkit.registry import get_method
from peftkit.spec import Spec


def _training_groups(model: nn.Module) -> list[tuple[type[Method], MethodConfig, list[Adapter]]]:
    """(method, configuration, adapters) per spec entry of the active adapters that train (none for a model
    without adapters: a loop may call these for full fine-tuning too)."""
    state = get_state(model)
    if state is None:
        return []
    groups = []
    for members in state.entries():
        training = [
            a.module
            for a in members
            if a.adapter_name in state.active
            and not a.module.merged
            and any(p.requires_grad for p in a.module.parameters())
        ]
        if training:
            groups.append((members[0].method, members[0].config, training))
    return groups


def check_schedule(spec: Spec | nn.Module | Mapping[str, Any] | str | Path, total_steps: int) -> None:
    """Refuse, before training, an entry whose schedule does not fit a run of ``total_steps`` optimizer steps
    (a :class:`~peftkit.errors.SpecError` naming the adapter, the field and the fix). Takes a spec, so that a loop
    can ask before it attaches anything, or a model with adapters attached."""
    if isinstance(spec, nn.Module):
        state = get_state(spec)
        if state is None:
            return
        spec = state.spec
    spec = Spec.coerce(spec)
    for adapter, entries in spec.adapters.items():
        for index, config in enumerate(entries):
            refusal = get_method(config.method).schedule_refusal(config, total_steps)
            if refusal:
                raise SpecError(f"adapters.{adapter}.{index} ({config.method}): {refusal}")


def regularization(model: nn.Module) -> torch.Tensor | float:
    """The sum of the attached methods' loss terms (``Method.training_loss``) for the adapters that train; 0.0 when
    none contributes. Add it to the task loss before ``backward``."""
    terms = [
        term
        for method, config, adapters in _training_groups(model)
        if (term := method.training_loss(config, adapters)) is not None
    ]
    return sum(terms[1:], terms[0]) if terms else 0.0


def after_optimizer_step(model: nn.Module, step: int, total_steps: int) -> None:
    """Let each method act on its adapters between optimizer steps (``Method.after_optimizer_step``): call it after
    ``optimizer.step()`` and before the gradients are cleared, with the 0-based index of the step just taken."""
    for method, config, adapters in _training_groups(model):
        method.after_optimizer_step(config, adapters, step, total_steps)


def acts_between_steps(spec: Spec | Mapping[str, Any] | str | Path) -> list[str]:
    """The methods of ``spec`` that act between optimizer steps (override ``Method.after_optimizer_step``): a loop
    that shards the adapters' parameters (FSDP2) cannot give them whole tensors and refuses them by name."""
    names = {config.method for entries in Spec.coerce(spec).adapters.values() for config in entries}
    base = Method.after_optimizer_step.__func__  # type: ignore[attr-defined]
    return sorted(n for n in names if get_method(n).after_optimizer_step.__func__ is not base)  # type: ignore[attr-defined]
