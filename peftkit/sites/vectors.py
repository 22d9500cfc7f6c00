"""Vector parameters: the site of an adapter that changes chosen 1-D parameters of a module (a bias, a norm's scale
and shift) by a delta kept beside them, so the base's own values never change.

An entry of this kind targets parameter paths (``*.bias``, ``model.norm.weight``). While the adapter runs, each
targeted vector reads as ``v + δ`` for the module's forward (:mod:`peftkit.sites.swap`), so the module's own
forward computes the adapted output whatever the module is: ``F.linear(x, W, b + δ)`` for a linear layer, a
LayerNorm or RMSNorm of any family with its scale moved. Merging adds δ to the vector for good.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from peftkit.sites.kinds import SiteContext, register_site_kind
from peftkit.sites.swap import SwappedParameterSite


@dataclass(frozen=True)
class VectorParameter:
    """One targeted 1-D parameter of a module."""

    name: str
    size: int


class VectorsSite(SwappedParameterSite):
    """The targeted 1-D parameters of one module."""

    kind = "vector"
    parameters: list[VectorParameter]


def make_vectors_site(module: nn.Module, context: SiteContext | None = None) -> VectorsSite | str:
    names = context.parameters if context is not None else ()
    if not names:
        return f"{type(module).__name__}: name the parameters to adapt (e.g. '*.bias')"
    layouts = []
    for name in names:
        parameter = module._parameters.get(name)
        if parameter is None:
            return f"parameter {name!r} of {type(module).__name__} does not exist"
        if parameter.dim() != 1 or not parameter.is_floating_point():
            return (
                f"parameter {name!r} of {type(module).__name__} has shape {tuple(parameter.shape)} and dtype "
                f"{parameter.dtype}: a vector site adapts 1-D floating-point parameters (biases, norm scales)"
            )
        layouts.append(VectorParameter(name, parameter.numel()))
    return VectorsSite(module, layouts)


register_site_kind("vector", make_vectors_site, by_parameter=True)
