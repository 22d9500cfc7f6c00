"""Hosts whose output an adapter computes together with its own change, in one autograd function.

A forward hook runs after its host, so it can only add to an output already computed; to compute both in one
function (:mod:`peftkit.sites.fused`) the core replaces such a host's ``forward`` on the instance, at attach, where
the host's site says its forward is a plain product (``fused_host``) and nobody else has replaced it (accelerate's
device hooks do, and must keep running). At each call the replacement asks the first adapter that acts on the
host's output whether it fuses for this input (:meth:`peftkit.method.Adapter.fuses`); if so the adapter computes the
host's output, and the forward hook, asking the same question of the same state, skips that adapter. Anything the
fused function does not cover (per-example routing, composition rules, an adapter that rewrote the host and does not
run, inference without autograd) takes the hook path, unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from peftkit.keys import ADAPTER_CONTAINER
from peftkit.lifecycle.state import ModelState
from peftkit.method import Adapter
from peftkit.sites.sublayer import first_input

# set on a host's adapter container while the host's forward is replaced here (the hook then asks about fusion)
FUSED_MARK = "peftkit_fused_forward"


def fused_adapter(state: ModelState, container: nn.ModuleDict, x: torch.Tensor) -> Adapter | None:
    """The adapter that computes the host's output for ``x`` in this call, or None (the host then runs itself).
    Without autograd nothing fuses, and that is asked first: inference pays one call here per host, not a search."""
    if not torch.is_grad_enabled() or state.routing is not None or state.spec.compose:
        return None
    first = None
    for name, adapter in container.items():
        running = name in state.active and not adapter.merged
        if not running and adapter.__dict__.get("peftkit_rewrites_base") and not adapter.merged:
            return None  # it gives back what it took out of the weight, on the host's own output
        if running and first is None:
            first = adapter
    return first if first is not None and first.fuses(x) else None


def _forward(state: ModelState, host: nn.Module, *args: Any, **kwargs: Any) -> Any:
    container = host._modules.get(ADAPTER_CONTAINER) if torch.is_grad_enabled() else None
    if container is not None and (args or kwargs):
        x = first_input(args, kwargs)
        adapter = fused_adapter(state, container, x)
        if adapter is not None:
            return adapter.fused_forward(x)
    return type(host).forward(host, *args, **kwargs)


class FusedForward:
    """The replacement of one host's forward, removable like a hook handle."""

    def __init__(self, state: ModelState, host: nn.Module, container: nn.ModuleDict) -> None:
        self.host = host
        # a partial of a module-level function, not a closure: copy.deepcopy(model) then points the copy's at the copy
        host.forward = functools.partial(_forward, state, host)
        container.__dict__[FUSED_MARK] = True

    def remove(self) -> None:
        """Take the replacement away, unless someone wrapped it since (accelerate's dispatch keeps the forward it
        found and calls it): theirs stays, and ours, with no adapters left on the host, runs the host's own."""
        forward = self.host.__dict__.get("forward")
        if isinstance(forward, functools.partial) and forward.func is _forward:
            del self.host.__dict__["forward"]
        container = self.host._modules.get(ADAPTER_CONTAINER)
        if container is not None:
            container.__dict__.pop(FUSED_MARK, None)


class HostHandles:
    """A host's forward hook and, where installed, its fused forward: removed together."""

    def __init__(self, *handles: Any) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in reversed(self.handles):
            handle.remove()


def can_replace_forward(site: Any, host: nn.Module) -> bool:
    """Whether the host's forward may be replaced: its site computes a plain product, and the instance has no
    forward of its own already (accelerate's offloading and device hooks live there)."""
    return bool(getattr(site, "fused_host", False)) and "forward" not in host.__dict__
