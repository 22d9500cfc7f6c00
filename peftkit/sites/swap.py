"""Sites that adapt parameters by name: while an adapter runs, each targeted parameter of its module reads as
``P + adapter.parameter_delta(name)`` for the length of the module's forward (one parameter-sized temporary), and
merging adds the delta to the parameter for good. The module's own forward then computes the adapted output,
whatever it does with the parameter: fused expert weights read by name (``experts``), a bias or a norm's scale
(``vectors``). Each kind of parameter says how a delta maps onto the stored layout (``as_stored``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from peftkit.keys import ADAPTER_CONTAINER
from peftkit.sites.weight import widened

# on the host module, during its forward only: parameter name -> the Parameter that the adapted value stands in for
_HELD = "_peftkit_parameters_held"


class SwappedParameterSite:
    """The targeted parameters of one module (``parameters``: layouts with a ``name`` each)."""

    kind = "parameter"

    def __init__(self, module: nn.Module, parameters: list[Any]) -> None:
        self.module = module
        self.parameters = parameters

    @property
    def device(self) -> torch.device:
        return self.module._parameters[self.parameters[0].name].device

    @property
    def dtype(self) -> torch.dtype:
        return self.module._parameters[self.parameters[0].name].dtype

    def as_stored(self, layout: Any, delta: torch.Tensor) -> torch.Tensor:
        """A delta in the parameter's own layout (by default the delta as it is)."""
        return delta

    def add_to_parameter_(self, name: str, delta: torch.Tensor) -> None:
        """Add an update computed in float32 or wider; cast once to the parameter's dtype."""
        parameter = self.module._parameters[name]
        layout = next(p for p in self.parameters if p.name == name)
        with torch.no_grad():
            parameter.copy_((widened(parameter) + self.as_stored(layout, delta)).to(parameter.dtype))

    def install(self, adapter: Any) -> list[Any]:
        """Hooks that put ``P + adapter.parameter_delta(name)`` in place of each parameter for one forward while
        the adapter runs, and the originals back after it. torch runs an ``always_call`` hook after an Exception
        but not after a KeyboardInterrupt, so the originals are also put back before the next forward's first
        hook (``prepend``) and when the adapter is removed."""
        stale = self.module.register_forward_pre_hook(_original_parameters_before, prepend=True)
        before = self.module.register_forward_pre_hook(functools.partial(_adapted_parameters, self, adapter))
        after = self.module.register_forward_hook(_original_parameters, always_call=True)
        return [stale, before, after, _RestoreOnRemove(self.module)]


class _RestoreOnRemove:
    """A handle whose ``remove`` (called when the adapter is detached) puts back any parameter still swapped."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def remove(self) -> None:
        _original_parameters(self.module, None, None)


def _running(module: nn.Module, adapter: Any) -> bool:
    container = module._modules.get(ADAPTER_CONTAINER)
    state = container.__dict__.get("_peftkit_state") if container is not None else None
    # while routing, only the routed adapters run, and route() refuses parameter-site ones
    if state is None or adapter.merged or state.routing is not None:
        return False
    return any(a is adapter and name in state.active for name, a in container.items())


def _adapted_parameters(site: SwappedParameterSite, adapter: Any, module: nn.Module, args: Any) -> None:
    if not _running(module, adapter):
        return
    held = module.__dict__.setdefault(_HELD, {})
    for layout in site.parameters:
        current = module._parameters[layout.name]
        held.setdefault(layout.name, current)
        delta = site.as_stored(layout, adapter.parameter_delta(layout.name))
        # a plain tensor in the parameter's slot: the experts forward reads it by name, autograd reaches the adapter
        module._parameters[layout.name] = current + delta.to(current.dtype)


def _original_parameters_before(module: nn.Module, args: Any) -> None:
    _original_parameters(module, args, None)


def _original_parameters(module: nn.Module, args: Any, output: Any) -> None:
    for name, parameter in module.__dict__.pop(_HELD, {}).items():
        module._parameters[name] = parameter
