"""Merge adapters into their hosts' weights for inference, and take them out again.

Merging is refused up front, before any weight changes, when a chosen adapter cannot be merged: its method says so,
a composition rule weights it, it says why not in its current state, or its host shares the weight with another
module (unless ``untie``). Unmerging is exact up to the rounding of the weight's dtype.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from peftkit.compose import weighted_adapters
from peftkit.errors import AttachError
from peftkit.lifecycle.state import AttachedAdapter, ModelState, require_state
from peftkit.sites.tied import shared_parameters


def merge(model: nn.Module, names: str | Iterable[str] | None = None, *, untie: bool = False) -> nn.Module:
    """Fold active adapters (or the named ones) into the base weights: no added latency at inference.

    Refused up front, before any weight changes, if a chosen adapter's method is not mergeable, or if its host
    shares a weight with another module (a tied LM head and input embedding): merging would change both modules,
    while the unmerged adapter changes only its host. ``untie=True`` gives each such host its own copy of the
    shared tensor while it is merged; :func:`unmerge` puts the shared tensor back, untouched.
    """
    state = require_state(model)
    chosen = input_transforms_last([a for a in mergeable_choice(state, names) if not a.module.merged])
    refusals = [(a, reason) for a in chosen if (reason := _host_refusal(a) or a.module.merge_refusal())]
    refusals += [(a, reason) for a in chosen if (reason := _left_unmerged_beside(state, a, chosen))]
    if refusals:
        attached, reason = refusals[0]
        raise AttachError(
            f"cannot merge adapter {attached.adapter_name!r} at {attached.path!r}: {reason} "
            f"({len(refusals)} such host(s)); nothing was merged"
        )
    # an adapter that follows its weight into every holder merges into the shared tensor, as it means to
    tied = {
        a.path: shared
        for a in chosen
        if not a.module.follows_tied_weight and (shared := shared_parameters(model, a.path))
    }
    if tied and not untie:
        path, shared = next(iter(tied.items()))
        owner = next(iter(shared.values()))[0]
        raise AttachError(
            f"cannot merge into {path!r}: its {', '.join(shared)} is the same tensor as {owner!r} (tied weights; "
            f"{len(tied)} such host(s)), so merging would change that module too and the model would no longer "
            "compute what it computes unmerged. Run it unmerged, leave the tied module out of the target, or "
            "merge(..., untie=True) to give each tied host its own copy of the weight while merged"
        )
    modules = dict(model.named_modules())
    for path, shared in tied.items():
        host = modules[path]
        originals = state.untied.setdefault(path, {})
        for name in shared:
            original = host._parameters[name]
            originals[name] = original
            host._parameters[name] = nn.Parameter(original.detach().clone(), requires_grad=original.requires_grad)
    for attached in chosen:
        attached.module.merge()
        attached.module.merged = True
    return model


def mergeable_choice(state: ModelState, names: Iterable[str] | None) -> list[AttachedAdapter]:
    """The active (or named) adapters, refused up front, before any weight changes, if one cannot be merged."""
    chosen = [a for a in state.adapters(names) if names is not None or a.adapter_name in state.active]
    weighted = weighted_adapters(state.spec.compose)
    refused = sorted(
        {(a.adapter_name, a.method.name) for a in chosen if not a.method.capabilities_for(a.config).mergeable}
    )
    refused += sorted(
        {(a.adapter_name, "weighted by a composition rule") for a in chosen if a.adapter_name in weighted}
    )
    if refused:
        raise AttachError(
            f"cannot merge {refused}: these methods are not mergeable (their capabilities say so); "
            "merge only the mergeable adapters by name, or run them unmerged"
        )
    return chosen


def unmerge(model: nn.Module, names: str | Iterable[str] | None = None) -> nn.Module:
    """Undo :func:`merge` (exact up to the rounding of the weight's dtype)."""
    state = require_state(model)
    chosen = [a for a in state.adapters(names) if a.module.merged]
    for attached in chosen:
        reason = _left_merged_beside(state, attached, chosen)
        if reason:
            raise AttachError(f"cannot unmerge adapter {attached.adapter_name!r} at {attached.path!r}: {reason}")
    for attached in reversed(input_transforms_last(chosen)):
        if attached.module.merged:
            attached.module.unmerge()
            attached.module.merged = False
    _retie(model, state)
    return model


def _retie(model: nn.Module, state: ModelState) -> None:
    """Give the hosts untied by ``merge(untie=True)`` that hold no merged adapter any more their shared tensor back
    (never written to, so the tie comes back exactly as it was)."""
    still_merged = {a.path for a in state.attached if a.module.merged}
    modules = dict(model.named_modules())
    for path in [p for p in state.untied if p not in still_merged]:
        for name, original in state.untied.pop(path).items():
            modules[path]._parameters[name] = original


def _host_refusal(attached: AttachedAdapter) -> str | None:
    """The host's own reason not to take a merge (its site's ``merge_refusal``: a quantised weight), if any."""
    refusal = getattr(getattr(attached.module, "site", None), "merge_refusal", None)
    return refusal() if callable(refusal) else None


# An adapter that changes its host's input (``Adapter.transforms_input``: OFT's rotation, IA3's input scale) acts on
# the whole host, the other adapters' updates included: unmerged, the host computes (W + dW_others) T x. The merged
# weight must therefore take the others first and the transform last, and unmerging undoes them in reverse; merging
# the transform alone while another adapter at its host stays unmerged would leave that adapter seeing x, not T x.
def input_transforms_last(adapters: list[AttachedAdapter]) -> list[AttachedAdapter]:
    """``adapters`` in merge order: attach order, except that input transforms come after the rest."""
    return sorted(adapters, key=lambda a: bool(a.module.transforms_input))


def _left_unmerged_beside(state: ModelState, attached: AttachedAdapter, chosen: list[AttachedAdapter]) -> str | None:
    if not attached.module.transforms_input:
        return None
    others = [
        a.adapter_name
        for a in state.attached
        if a.path == attached.path
        and a is not attached
        and a.adapter_name in state.active
        and not a.module.merged
        and a not in chosen
    ]
    if others:
        return (
            f"it changes its host's input, which the active adapters {others} at the same host read; merging it alone "
            "would change what they compute. Merge them together (or deactivate them first)"
        )
    return None


def _left_merged_beside(state: ModelState, attached: AttachedAdapter, chosen: list[AttachedAdapter]) -> str | None:
    if attached.module.transforms_input:
        return None
    transforms = [
        a.adapter_name
        for a in state.attached
        if a.path == attached.path and a.module.transforms_input and a.module.merged and a not in chosen
    ]
    if transforms:
        return (
            f"the input transform(s) {transforms} at the same host were merged after it and stay merged; unmerge "
            "them together"
        )
    return None
