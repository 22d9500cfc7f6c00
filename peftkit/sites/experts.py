"""Fused mixture-of-experts parameters: the site of an adapter that changes chosen 3-D expert weights.

transformers 5 stores a layer's experts as 3-D parameters of one module (Qwen3-MoE's ``mlp.experts.gate_up_proj``
(E, 2I, H) and ``mlp.experts.down_proj`` (E, H, I); Mixtral, DeepSeek, GPT-OSS alike), and the experts
implementations it dispatches to (an eager loop, grouped or batched matmul kernels) read them by name. No
``nn.Linear`` exists per expert, so an adapter cannot sit on one: it adapts the parameter itself. While an adapter
runs, each targeted parameter reads as ``W + ΔW`` for the length of its module's forward (one weight-sized
temporary, as HF PEFT's ``target_parameters``), and merging adds ΔW to it for good.

The layout is the one transformers declares on the class through ``use_experts_implementation``: ``is_transposed``
False stores expert e's map as ``W[e]`` of shape (out, in), True as (in, out). A parameter of a module that declares
no layout, or one that is not 3-D with one slice per expert, is refused by name: guessing would silently adapt the
wrong axis.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit.keys import ADAPTER_CONTAINER
from peftkit.sites.kinds import SiteContext, register_site_kind
from peftkit.sites.weight import widened

# on the host module, during its forward only: parameter name -> the Parameter that the adapted value stands in for
_HELD = "_peftkit_parameters_held"


@dataclass(frozen=True)
class ExpertParameter:
    """One targeted 3-D parameter, seen as ``experts`` maps from ``in_features`` to ``out_features``."""

    name: str
    experts: int
    out_features: int
    in_features: int
    transposed: bool  # stored as (experts, in, out)


class ExpertsSite:
    """The targeted parameters of one experts module."""

    kind = "parameter"

    def __init__(self, module: nn.Module, parameters: list[ExpertParameter]) -> None:
        self.module = module
        self.parameters = parameters

    @property
    def device(self) -> torch.device:
        return self.module._parameters[self.parameters[0].name].device

    @property
    def dtype(self) -> torch.dtype:
        return self.module._parameters[self.parameters[0].name].dtype

    @staticmethod
    def as_stored(layout: ExpertParameter, delta: torch.Tensor) -> torch.Tensor:
        """An (experts, out, in) update in the parameter's own layout (a view)."""
        return delta.transpose(1, 2) if layout.transposed else delta

    def add_to_parameter_(self, name: str, delta: torch.Tensor) -> None:
        """Add an (experts, out, in) update computed in float32 or wider; cast once to the parameter's dtype."""
        parameter = self.module._parameters[name]
        layout = next(p for p in self.parameters if p.name == name)
        with torch.no_grad():
            parameter.copy_((widened(parameter) + self.as_stored(layout, delta)).to(parameter.dtype))

    def install(self, adapter: Any) -> list[Any]:
        """Hooks that put ``W + adapter.parameter_delta(name)`` in place of each parameter for one forward while
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


def _adapted_parameters(site: ExpertsSite, adapter: Any, module: nn.Module, args: Any) -> None:
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


def expert_layout(module: nn.Module, name: str) -> ExpertParameter | str:
    """The layout of ``module``'s parameter ``name``, or why the site does not know it."""
    parameter = module._parameters.get(name)
    where = f"parameter {name!r} of {type(module).__name__}"
    if parameter is None:
        return f"{where} does not exist"
    transposed = getattr(module, "is_transposed", None)
    if not isinstance(transposed, bool):
        return (
            f"{where} ({tuple(parameter.shape)}) belongs to a module that declares no experts layout (transformers' "
            "use_experts_implementation sets is_transposed); adapt its module with a weight-site method "
            "instead"
        )
    experts = getattr(module, "num_experts", None)
    if parameter.dim() != 3 or (isinstance(experts, int) and parameter.shape[0] != experts):
        return f"{where} has shape {tuple(parameter.shape)}, not (num_experts={experts}, d1, d2)"
    if not parameter.is_floating_point():
        return f"{where} is {parameter.dtype} (quantized?); the site adapts floating-point expert weights"
    first, second = parameter.shape[1], parameter.shape[2]
    out_features, in_features = (second, first) if transposed else (first, second)
    return ExpertParameter(name, parameter.shape[0], out_features, in_features, transposed)


def make_experts_site(module: nn.Module, context: SiteContext | None = None) -> ExpertsSite | str:
    names = context.parameters if context is not None else ()
    if not names:
        return f"{type(module).__name__}: name the expert parameters to adapt (e.g. 'mlp.experts.gate_up_proj')"
    layouts = []
    for name in names:
        layout = expert_layout(module, name)
        if isinstance(layout, str):
            return layout
        layouts.append(layout)
    return ExpertsSite(module, layouts)


register_site_kind("parameter", make_experts_site)
