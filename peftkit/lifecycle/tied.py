"""Weights that several modules hold (a tied LM head and input embedding), and adapters that follow them there.

An adapter that changes its host's weight *as a value* (replaced rows of an embedding) must change every module that
holds the same tensor, or the model stops computing what its tie says: the new token's embedding and its output
logit would disagree. Such an adapter sets ``follows_tied_weight``; the core then finds the other holders from the
parameters themselves (whatever transformers calls them) and runs the adapter's ``tied_forward`` at each.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from peftkit.errors import AttachError
from peftkit.lifecycle.state import ModelState
from peftkit.method import Adapter
from peftkit.sites.tied import tied_holders


def holders_to_follow(model: nn.Module, built: list[tuple[Any, Adapter]]) -> dict[int, dict[str, nn.Module]]:
    """For each built adapter that follows its weight: the holders it will run at (by ``id(adapter)``), refused
    before the model is touched when the adapter cannot act at one of them."""
    following: dict[int, dict[str, nn.Module]] = {}
    for item, adapter in built:
        if not adapter.follows_tied_weight:
            continue
        holders = tied_holders(model, item.row.path)
        for holder_path, holder in holders.items():
            reason = adapter.tied_refusal(holder)
            if reason:
                raise AttachError(
                    f"{item.method.name!r} at {item.row.path!r} changes a weight that {holder_path!r} "
                    f"({type(holder).__name__}) holds too, and cannot follow it there: {reason}. Untie the weights "
                    "first (give the module its own copy), or target another module"
                )
        following[id(adapter)] = holders
    return following


def follow(state: ModelState, name: str, adapter: Adapter, holders: dict[str, nn.Module]) -> list[RemovableHandle]:
    """A forward hook on each holder that runs the adapter's ``tied_forward`` while the adapter is in effect."""
    hook = functools.partial(_run_at_holder, state, name, adapter)  # a partial, not a closure: deepcopy-safe
    return [holder.register_forward_hook(hook) for holder in holders.values()]


def _run_at_holder(
    state: ModelState, name: str, adapter: Adapter, module: nn.Module, args: tuple[Any, ...], out: Any
) -> Any:
    if adapter.merged or not isinstance(out, torch.Tensor):
        return None
    routing = state.routing
    if routing is None:
        return adapter.tied_forward(module, args[0], out) if name in state.active else None
    if name not in routing.names:  # routed per example: only the rows routed to this adapter
        return None
    rows = routing.index_on(out.device) == routing.names.index(name)
    return out.index_put((rows,), adapter.tied_forward(module, args[0][rows], out[rows]))
