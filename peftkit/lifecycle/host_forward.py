"""How a host's output gets its adapters: a forward hook, or, where an adapter can fuse with its host, the host's
forward itself.

Every host runs :func:`run_adapters` on its output. Most get it as a forward hook. A host whose site says its
forward is a plain product (``fused_host``: ``nn.Linear``, ``Conv1D``) instead gets its class swapped, at attach, for
a subclass whose ``forward`` asks the first adapter acting on the host's output whether it fuses for this input
(:meth:`peftkit.method.Adapter.fuses`). If so, the adapter computes the host's product together with its update in
one autograd function (:mod:`peftkit.sites.fused`); otherwise the host's own forward runs. Then the remaining
adapters run, in that same call. The decision is made once per call, so nothing can change between it and the adapters
that follow (an offloading hook moving the weight, another thread entering ``peftkit.unfused``).

The class is swapped, not the instance's ``forward``: a bound method follows its module, so ``nn.DataParallel``'s
replicas (which copy ``__dict__``) and ``copy.deepcopy`` run their own weights; this is how ``torch.nn.utils.
parametrize`` changes a module's behaviour too. The subclass keeps the original's name, is made once per original
class, pickles as the original plus its state, and is swapped back at detach. A host whose ``forward`` someone else
replaced on the instance (accelerate's device and offload hooks) keeps the hook path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftkit.compose import compose_output
from peftkit.keys import ADAPTER_CONTAINER, BASE_CLASS
from peftkit.lifecycle.activation import routed_output
from peftkit.lifecycle.state import ModelState
from peftkit.method import Adapter
from peftkit.sites.sublayer import first_input


def _running_and_dormant(state: ModelState, container: nn.ModuleDict) -> tuple[list[Adapter], list[Adapter]]:
    """The adapters that act on the host's output now, and those that rewrote the host's weight and do not run (they
    give back what they took out of the weight)."""
    running = [a for n, a in container.items() if n in state.active and not a.merged]
    dormant = [
        a
        for n, a in container.items()
        if a.__dict__.get("peftkit_rewrites_base") and not a.merged and (n not in state.active or state.routing)
    ]
    return running, dormant


def run_adapters(
    state: ModelState,
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    out: Any,
    fused: Adapter | None = None,
) -> Any:
    """The host's output with its adapters applied (None where nothing changes it). ``fused``: the adapter that
    already computed ``out`` with its own change, skipped here."""
    container = getattr(module, ADAPTER_CONTAINER)
    running, dormant = _running_and_dormant(state, container)
    running = [a for a in running if a is not fused]
    if not running and not dormant and state.routing is None:
        return None
    x = first_input(args, kwargs)
    hidden = out if isinstance(out, torch.Tensor) else out[0]  # sub-layers may return (hidden, weights, ...)
    for adapter in dormant:
        hidden = adapter.removed_forward(x, hidden)
    if state.routing is not None:
        hidden = routed_output(container, state.routing, x, hidden)
    elif state.spec.compose:
        hidden = compose_output(container, state.spec.compose, state.active, x, hidden)
    else:
        for adapter in running:
            hidden = adapter(x, hidden)
    if isinstance(out, torch.Tensor):
        return hidden
    return (hidden, *out[1:]) if isinstance(out, tuple) else type(out)([hidden, *out[1:]])


def fused_adapter(state: ModelState, container: nn.ModuleDict, x: torch.Tensor, host: nn.Module) -> Adapter | None:
    """The adapter that computes the host's output for ``x`` in this call, or None (the host then runs itself): the
    first running one, where no dormant one needs the host's own output. Without autograd nothing fuses, and that is
    asked first: inference pays one call here per host, not a search."""
    if not torch.is_grad_enabled() or state.routing is not None or state.spec.compose:
        return None
    running, dormant = _running_and_dormant(state, container)
    return running[0] if running and not dormant and running[0].fuses(x, host) else None


def _fusing_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The swapped class's forward: the host's product, fused with its first adapter where that adapter says so,
    then the other adapters."""
    original = getattr(type(self), BASE_CLASS, type(self))  # a forward kept from before detach finds no adapters
    container = self._modules.get(ADAPTER_CONTAINER)
    if container is None or not (args or kwargs):
        return original.forward(self, *args, **kwargs)
    state = container.__dict__["_peftkit_state"]
    x = first_input(args, kwargs)
    adapter = fused_adapter(state, container, x, self)
    out = adapter.fused_forward(x, self) if adapter is not None else original.forward(self, *args, **kwargs)
    adapted = run_adapters(state, self, args, kwargs, out, fused=adapter)
    return out if adapted is None else adapted


def _rebuilt(original: type[nn.Module]) -> nn.Module:
    """An empty instance of the swapped class of ``original`` (pickle then restores its state)."""
    return nn.Module.__new__(fusing_class(original))


def _reduce_ex(self: nn.Module, protocol: int) -> tuple:
    return _rebuilt, (getattr(type(self), BASE_CLASS),), self.__getstate__()


_FUSING_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def fusing_class(original: type[nn.Module]) -> type[nn.Module]:
    """The subclass of ``original`` whose forward runs the adapters itself; one per original class."""
    if original not in _FUSING_CLASSES:
        members = {"forward": _fusing_forward, "__reduce_ex__": _reduce_ex, BASE_CLASS: original}
        _FUSING_CLASSES[original] = type(original.__name__, (original,), members)
    return _FUSING_CLASSES[original]


class SwappedClass:
    """A host's class swapped for its fusing subclass, removable like a hook handle."""

    def __init__(self, host: nn.Module) -> None:
        self.host = host
        host.__class__ = fusing_class(type(host))

    def remove(self) -> None:
        original = type(self.host).__dict__.get(BASE_CLASS)
        if original is not None:
            self.host.__class__ = original


def can_swap_class(site: Any, host: nn.Module) -> bool:
    """Whether the host's forward may run its adapters itself: its site computes a plain product, and the instance
    has no forward of its own (accelerate's hooks live there, and must keep running around the host's)."""
    return bool(getattr(site, "fused_host", False)) and "forward" not in host.__dict__
