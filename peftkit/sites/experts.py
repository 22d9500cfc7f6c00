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

from dataclasses import dataclass

import torch
from torch import nn

from peftkit.sites.kinds import SiteContext, register_site_kind
from peftkit.sites.swap import SwappedParameterSite


@dataclass(frozen=True)
class ExpertParameter:
    """One targeted 3-D parameter, seen as ``experts`` maps from ``in_features`` to ``out_features``."""

    name: str
    experts: int
    out_features: int
    in_features: int
    transposed: bool  # stored as (experts, in, out)


class ExpertsSite(SwappedParameterSite):
    """The targeted 3-D parameters of one experts module."""

    parameters: list[ExpertParameter]

    @staticmethod
    def as_stored(layout: ExpertParameter, delta: torch.Tensor) -> torch.Tensor:
        """An (experts, out, in) update in the parameter's own layout (a view)."""
        return delta.transpose(1, 2) if layout.transposed else delta


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


register_site_kind("parameter", make_experts_site, by_parameter=True)
