"""Adapters that rewrite their host's weight when they are attached, and the record that undoes it exactly.

Some initialisations move part of the pretrained weight into the adapter and leave a residual in the host (PiSSA's
principal singular directions, OLoRA's QR factors): the adapter is then an identity at init only together with the
residual. The core keeps the host's original parameters (a CPU copy, so GPU memory does not double), hands them
back bit for bit at detach, and refuses, before anything changes, what could not be undone: a second rewriting
adapter on one host, a host whose weight is merged into or shared with another module, a weight with no values.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from peftkit.errors import AttachError
from peftkit.lifecycle.state import AttachedAdapter, ModelState
from peftkit.method import Adapter
from peftkit.sites.tied import shared_parameters


def rewrites_base(item: Any) -> bool:
    """Whether a planned item or an attached adapter rewrites its host (its configuration's capabilities say so)."""
    return item.method.capabilities_for(item.config).rewrites_base


def refuse_rewrites(model: nn.Module, state: ModelState | None, planned: Iterable[Any]) -> None:
    """Refuse, before the model is touched, a rewriting adapter whose change could not be undone exactly."""
    attached = state.attached if state is not None else []
    owner = {a.path: a.adapter_name for a in attached if rewrites_base(a)}
    merged = {a.path: a.adapter_name for a in attached if a.module.merged}
    for item in planned:
        if not rewrites_base(item):
            continue
        path, name, method = item.row.path, item.row.adapter, item.method.name
        where = f"{method!r} (adapter {name!r}) at {path!r} rewrites its host's weight at attach"
        if path in owner:
            raise AttachError(
                f"{where}, and adapter {owner[path]!r} already rewrote it; one host takes one such adapter: put the "
                "second on other modules, or give it an initialisation that leaves the weight alone"
            )
        if path in merged:
            raise AttachError(f"{where}, but adapter {merged[path]!r} is merged into it; unmerge it first")
        shared = shared_parameters(model, path)
        if shared:
            other = next(iter(shared.values()))[0]
            raise AttachError(
                f"{where}, but its {', '.join(shared)} is the same tensor as {other!r}'s (tied weights), which "
                "would change too; leave the tied module out of the target"
            )
        weights = [p for p in item.module._parameters.values() if p is not None]
        if any(p.is_meta for p in weights):
            raise AttachError(
                f"{where} from the weight's values, and the host is on the meta device; load or materialise the "
                "model's weights first"
            )
        owner[path] = name


def rewrite(
    state: ModelState, path: str, adapter_name: str, host: nn.Module, adapter: Adapter, undo: list[Callable[[], None]]
) -> None:
    """Keep the host's original parameters, then let the adapter write the residual; ``undo`` puts them back."""
    originals = {name: p.detach().to("cpu", copy=True) for name, p in host._parameters.items() if p is not None}
    state.originals[path] = (adapter_name, originals)
    undo.append(functools.partial(restore, state, path, host))
    adapter.rewrite_base()


def restore(state: ModelState, path: str, host: nn.Module) -> None:
    """Put the host's original parameters back, bit for bit, in the tensors the model already holds."""
    _, originals = state.originals.pop(path)
    with torch.no_grad():
        for name, value in originals.items():
            host._parameters[name].copy_(value)


def rewritten_by(state: ModelState, attached: AttachedAdapter) -> bool:
    return state.originals.get(attached.path, (None,))[0] == attached.adapter_name


def refuse_restoring_under_merged(state: ModelState, removing: list[AttachedAdapter]) -> None:
    """Detaching a rewriting adapter puts the original weight back; an adapter that stays, merged into that host,
    would lose its update (and its unmerge would subtract it from the original). Refused before anything changes."""
    gone = {(a.path, a.adapter_name) for a in removing}
    for attached in removing:
        if not rewritten_by(state, attached):
            continue
        staying = [
            a.adapter_name
            for a in state.attached
            if a.path == attached.path and a.module.merged and (a.path, a.adapter_name) not in gone
        ]
        if staying:
            raise AttachError(
                f"detaching {attached.adapter_name!r} restores the original weight of {attached.path!r}, where "
                f"{staying} is merged; unmerge it first"
            )


def refuse_baking_over_a_residual(state: ModelState, chosen: list[AttachedAdapter]) -> None:
    """``merge_and_detach`` keeps the merged weight for good; at a host whose weight is a residual left by an
    adapter that is not baked with it, that adapter's detach would later restore the original and drop the update."""
    baked = {(a.path, a.adapter_name) for a in chosen}
    for attached in chosen:
        owner = state.originals.get(attached.path, (None,))[0]
        if owner is not None and (attached.path, owner) not in baked:
            raise AttachError(
                f"cannot bake {attached.adapter_name!r} into {attached.path!r}: its weight is the residual left by "
                f"adapter {owner!r}, which is not baked with it; merge_and_detach both, or neither"
            )
