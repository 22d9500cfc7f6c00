"""Which attached adapters run: activate a subset, disable all for a while, route each example to its own adapter.

Activation never changes trainability: ``requires_grad`` flags move only through :func:`set_trainable` (and
``attach``, which makes what it attaches trainable), so switching tasks cannot silently change what an optimiser
updates.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from peftkit.errors import AttachError
from peftkit.lifecycle.state import require_state
from peftkit.method import Adapter
from peftkit.sites.kinds import targets_parameters


def active_adapters(model: nn.Module) -> list[str]:
    """The names of the adapters that run, in the order they were attached."""
    state = require_state(model)
    return [name for name in dict.fromkeys(a.adapter_name for a in state.attached) if name in state.active]


def activate(model: nn.Module, names: str | Iterable[str]) -> nn.Module:
    """Run exactly these attached adapters from now on (an empty list runs the base model)."""
    state = require_state(model)
    wanted = {names} if isinstance(names, str) else set(names)
    state.adapters(wanted)  # raises, naming the unknown ones
    state.active = wanted
    return model


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model inside the ``with`` block; the previous activation comes back after it."""
    state = require_state(model)
    previous, state.active = state.active, set()
    try:
        yield model
    finally:
        state.active = previous


def set_trainable(model: nn.Module, names: str | Iterable[str], trainable: bool = True) -> nn.Module:
    """Make the named adapters' parameters trainable (or frozen); other parameters keep their flags."""
    state = require_state(model)
    for attached in state.adapters({names} if isinstance(names, str) else set(names)):
        for parameter in attached.module.parameters():
            parameter.requires_grad_(trainable)
    return model


@dataclass(frozen=True)
class Routing:
    """Example i of the batch runs with adapter ``names[index[i]]`` (None: the base model alone)."""

    names: tuple[str | None, ...]
    index: torch.Tensor

    def index_on(self, device: torch.device) -> torch.Tensor:
        return self.index if self.index.device == device else self.index.to(device)


@contextmanager
def route(model: nn.Module, per_example: Sequence[str | None]) -> Iterator[nn.Module]:
    """Inside the block, example i of each batch runs with adapter ``per_example[i]`` only (None: no adapter).

    Methods that declare ``routable`` run all examples in one batched computation; others run once per adapter on
    that adapter's rows. Merged adapters cannot be routed, and neither can attention or input sites yet.
    """
    state = require_state(model)
    names = tuple(dict.fromkeys(per_example))
    attached = state.adapters({n for n in names if n is not None})
    problems = [f"{a.adapter_name} is merged" for a in attached if a.module.merged]
    problems += [
        f"{a.adapter_name} ({a.method.name}) sits at an {a.method.capabilities.site} site"
        for a in attached
        if a.method.capabilities.site in {"attention", "input"} or targets_parameters(a.method.capabilities.site)
    ]
    problems += [
        f"{a.adapter_name} rewrote the weight of {a.path} at attach (a residual base: its examples cannot run "
        "beside others')"
        for a in attached
        if a.method.capabilities_for(a.config).rewrites_base
    ]
    if problems:
        raise AttachError("cannot route: " + "; ".join(sorted(set(problems))) + "; unmerge or activate them instead")
    index = torch.tensor([names.index(n) for n in per_example], dtype=torch.long)
    previous, state.routing = state.routing, Routing(names, index)
    try:
        yield model
    finally:
        state.routing = previous


def routed_output(
    container: Mapping[str, Adapter], routing: Routing, x: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """The host's output with each example's own adapter applied (called by the host hook while routing)."""
    here = [container[name] if name is not None and name in container else None for name in routing.names]
    if all(
        a is None for a in here
    ):  # no routed adapter at this host (its input need not be batch-first, e.g. an experts module)
        return out
    if x.shape[0] != routing.index.shape[0]:
        raise AttachError(f"routing names {routing.index.shape[0]} examples, but the batch holds {x.shape[0]}")
    index = routing.index_on(out.device)
    methods = {id(getattr(a, "peftkit_method", None)): getattr(a, "peftkit_method", None) for a in here if a}
    for method in methods.values():
        group = [a if a is not None and getattr(a, "peftkit_method", None) is method else None for a in here]
        batched = None
        if method is not None and method.capabilities.routable:
            batched = method.route(group, index, x, out)
        if batched is not None:
            out = batched
            continue
        for position, adapter in enumerate(group):  # the general path: each adapter on its own rows
            rows = index == position
            if adapter is not None and bool(rows.any()):
                out = out.index_put((rows,), adapter(x[rows], out[rows]))
    return out


def routed_input(adapter: Adapter, name: str, routing: Routing, x: torch.Tensor) -> torch.Tensor:
    """An input transform applied to the rows routed to ``name`` only."""
    if name not in routing.names:
        return x
    rows = routing.index_on(x.device) == routing.names.index(name)
    return x.index_put((rows,), adapter.transform_input(x[rows]))
