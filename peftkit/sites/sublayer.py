"""Output and parallel sites: a module seen through the hidden states that enter and leave it.

An **output** site hands an adapter the host's output to transform (a sequential bottleneck adapter after an
output projection). A **parallel** site hands it the sub-layer's input as well, so that it can add a function of
the input to the output (He et al.'s parallel adapter). When a family computes the residual add inside the
module that holds the output projection (BERT's ``BertOutput``), the sub-layer's input is read by a pre-hook at the
sub-layer's entry (``placements.SUBLAYER_INPUTS``) and handed over at the output.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from peftkit.sites.kinds import SiteContext, device_and_dtype, register_site_kind
from peftkit.sites.weight import Conv1D


def _projection_types() -> tuple[type[nn.Module], ...]:
    return (nn.Linear,) if Conv1D is None else (nn.Linear, Conv1D)


def _sizes(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return tuple(module.weight.shape)  # Conv1D: (in_features, out_features)


def feature_sizes(module: nn.Module) -> tuple[int, int] | str:
    """(features in, features out) of a projection, or of a sub-layer from its first and last projections."""
    projections = _projection_types()
    if isinstance(module, projections):
        return _sizes(module)
    if any(isinstance(m, nn.ModuleList) for m in module.modules()):
        return f"{type(module).__name__} holds a stack of layers; target one sub-layer or projection instead"
    inner = [m for m in module.modules() if isinstance(m, projections)]
    if not inner:
        return f"{type(module).__name__} holds no linear projection from which to read its hidden size"
    return _sizes(inner[0])[0], _sizes(inner[-1])[1]


def first_input(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor:
    """The hidden states a module was called with, positionally or as ``hidden_states=``."""
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return next(value for value in kwargs.values() if isinstance(value, torch.Tensor))


class SublayerSite:
    def __init__(self, kind: str, module: nn.Module, in_features: int, out_features: int, source: nn.Module | None):
        self.kind = kind
        self.module = module
        self.in_features, self.out_features = in_features, out_features
        self.source = source
        self._captured: torch.Tensor | None = None
        self.device, self.dtype = device_and_dtype(module)

    def install(self, adapter: object = None) -> list[RemovableHandle]:
        """Extra hooks this site needs; a sub-layer read at another module's entry records that module's input."""
        if self.source is None:
            return []
        # a bound method, not a closure: copy.deepcopy(model) rebinds it to the copy's site
        return [self.source.register_forward_pre_hook(self._record, with_kwargs=True)]

    def _record(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._captured = first_input(args, kwargs)

    def sublayer_input(self, x: torch.Tensor) -> torch.Tensor:
        """The sub-layer's input for this call (the host's own input unless it is read elsewhere)."""
        if self.source is None:
            return x
        captured, self._captured = self._captured, None  # do not keep an activation alive between calls
        if captured is None:
            raise RuntimeError("the sub-layer input was not recorded: was the host called outside its sub-layer?")
        return captured


def make_sublayer_site(kind: str, module: nn.Module, context: SiteContext | None) -> SublayerSite | str:
    # A sub-layer found as a named place maps the block's hidden size to itself; that width is trusted over the
    # host's first and last projections, which in a mixture of experts are a router and a shared expert's gate.
    hidden = context.places.hidden_size(context.path) if context is not None and context.places else None
    sizes = (hidden, hidden) if hidden is not None else feature_sizes(module)
    if isinstance(sizes, str):
        return sizes
    if next(module.parameters(), None) is None:
        return f"{type(module).__name__} has no parameters to take a device and dtype from"
    source = None
    if kind == "parallel" and context is not None:
        source_path = context.places.sublayer_input_path(context.path) if context.places else context.path
        if source_path != context.path:
            source = context.modules.get(source_path)
            if source is None:
                return f"its sub-layer input is read at {source_path!r}, which this model does not have"
            sizes = (feature_sizes(source) if not isinstance(feature_sizes(source), str) else sizes)[0], sizes[1]
    return SublayerSite(kind, module, sizes[0], sizes[1], source)


register_site_kind("output", lambda module, context: make_sublayer_site("output", module, context))
register_site_kind("parallel", lambda module, context: make_sublayer_site("parallel", module, context))
