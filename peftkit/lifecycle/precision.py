"""How much a merge loses to the base weights' dtype, measured before anyone merges.

Merging computes each update in float32 and casts the sum once to the weight's dtype (see ``WeightSite``); on a
bf16 base that one cast still rounds. :func:`merge_error` reports that rounding per adapted module by running the
merge twice on stand-in tensors — once in the weight's own dtype, once in float64 — and comparing; the model's own
parameters are swapped back untouched, so nothing about the model changes.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from peftkit.lifecycle.dequantize import requantization_error
from peftkit.lifecycle.merging import mergeable_choice
from peftkit.lifecycle.state import AttachedAdapter, require_state
from peftkit.sites.weight import WeightSite


def merge_error(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, float]:
    """Per adapted module: the largest |merged - exact| over its weight (and bias) that merging the active (or
    named) adapters would leave, where exact is the same merge carried out in float64. On a quantised host
    (bitsandbytes 4- or 8-bit) it is what re-quantising the merged weight would lose: the float64 merge into the
    dequantised weight against its round trip through the host's storage format. Refused, like
    :func:`peftkit.merge`, when a chosen adapter cannot be merged."""
    state = require_state(model)
    chosen = mergeable_choice(state, names)
    modules = dict(model.named_modules())
    by_host: dict[str, list] = {}
    by_attached: dict[str, list[AttachedAdapter]] = {}
    for attached in chosen:
        if not attached.module.merged:
            by_host.setdefault(attached.path, []).append(attached.module)
            by_attached.setdefault(attached.path, []).append(attached)
    errors = {}
    for path, adapters in by_host.items():
        site = getattr(adapters[0], "site", None)
        if site is not None and type(site).requantized is not WeightSite.requantized:
            errors[path] = requantization_error(by_attached[path], site)  # quantised storage: a round trip
            continue
        parameters = dict(modules[path].named_parameters(recurse=False))
        originals = {name: parameter.data for name, parameter in parameters.items()}
        merged = {}
        try:
            for label, dtype in (("exact", torch.float64), ("own", None)):
                for name, parameter in parameters.items():
                    original = originals[name]
                    parameter.data = original.to(dtype) if dtype is not None else original.clone()
                with torch.no_grad():
                    for adapter in adapters:
                        adapter.merge()
                merged[label] = {name: parameter.data.double() for name, parameter in parameters.items()}
        finally:
            for name, parameter in parameters.items():
                parameter.data = originals[name]
        errors[path] = max((merged["own"][n] - merged["exact"][n]).abs().max().item() for n in parameters)
    return errors
