"""Adapters trained over a quantised base, merged into a dequantised copy of it instead of its packed weights.

Folding an update into 4 or 8 bits re-quantises the weight, so :func:`peftkit.merge` refuses it. What QLoRA users
keep instead is a floating-point model with the update merged: each quantised host's site builds a plain module
holding its dequantised weight (``WeightSite.dequantized``), the adapters merge into that stand-in exactly as they
would into any floating-point host (their ``site`` is pointed at the stand-in for the merge and then back), and the
stand-in takes the host's place once the adapters are detached. Everything that can fail runs before the model
changes.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from peftkit.errors import AttachError
from peftkit.lifecycle.state import AttachedAdapter, ModelState
from peftkit.sites.weight import WeightSite, make_weight_site, weight_site_types


def quantized_sites(model: nn.Module) -> dict[str, WeightSite]:
    """Every module of ``model`` whose weight site is stored quantised (its site can build a dequantised copy)."""
    types = weight_site_types()
    found = {}
    for path, module in model.named_modules():
        if isinstance(module, types):
            site = make_weight_site(module)
            if isinstance(site, WeightSite) and type(site).dequantized is not WeightSite.dequantized:
                found[path] = site
    return found


def merged_into_stand_in(adapters: Iterable[AttachedAdapter], site: WeightSite, dtype: torch.dtype) -> nn.Module:
    """The host's dequantised module in ``dtype`` with ``adapters``' updates merged into it; the host and the
    adapters are left as they were."""
    module = site.dequantized(dtype)
    stand_in = make_weight_site(module)
    for attached in adapters:
        adapter = attached.module
        original = adapter.site
        adapter.site = stand_in
        try:
            with torch.no_grad():
                adapter.merge()
        finally:
            adapter.site = original
    return module


def dequantized_hosts(
    model: nn.Module, state: ModelState, chosen: list[AttachedAdapter], dtype: torch.dtype
) -> dict[str, nn.Module]:
    """For every quantised module of the model, its floating-point replacement in ``dtype``, holding the merged
    updates of the chosen adapters there. Refused, before anything changes, when an adapter that is not being
    merged sits on such a module (it would be left on a module that is gone), or when a chosen adapter does not
    expose its weight site as ``site`` (the stand-in merge cannot reach it)."""
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise AttachError(f"dequantize={dtype!r}: give a floating-point torch dtype, e.g. torch.bfloat16")
    sites = quantized_sites(model)
    chosen_ids = {id(a) for a in chosen}
    left = [a for a in state.attached if a.path in sites and id(a) not in chosen_ids]
    if left:
        raise AttachError(
            f"cannot dequantize: adapter {left[0].adapter_name!r} at {left[0].path!r} is not being merged and its "
            "quantised host would be replaced; merge it too (name it), or detach it first; nothing was changed"
        )
    blind = [a for a in chosen if a.path in sites and getattr(a.module, "site", None) is None]
    if blind:
        raise AttachError(
            f"cannot merge adapter {blind[0].adapter_name!r} ({blind[0].method.name}) into a dequantised "
            f"{blind[0].path!r}: the adapter keeps no weight site as .site; nothing was changed"
        )
    by_host: dict[str, list[AttachedAdapter]] = {}
    for attached in chosen:
        if attached.path in sites:
            by_host.setdefault(attached.path, []).append(attached)
    return {path: merged_into_stand_in(by_host.get(path, []), site, dtype) for path, site in sites.items()}


def install_dequantized(model: nn.Module, replacements: dict[str, nn.Module], dtype: torch.dtype) -> nn.Module:
    """Put the replacements in their hosts' places, drop transformers' record that the model is quantised (so
    ``save_pretrained`` writes a plain checkpoint), and cast the whole model to ``dtype``."""
    for path, module in replacements.items():
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, name, module)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)  # transformers' own undo of its quantised load
    model.to(dtype)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "dtype"):
        config.dtype = dtype
    return model


def requantization_error(adapters: list[AttachedAdapter], site: WeightSite) -> float:
    """The largest |kept - exact| a merge into a quantised host would leave: exact is the merge in float64 on a
    dequantised stand-in, kept is that weight after a round trip through the host's storage format (and its bias
    in the bias's dtype)."""
    exact = merged_into_stand_in(adapters, site, torch.float64)
    kept = site.requantized(exact.weight.detach())
    error = (kept.double() - exact.weight.detach()).abs().max().item()
    bias = getattr(site.module, "bias", None)
    if isinstance(bias, torch.Tensor) and exact.bias is not None:
        rounded = exact.bias.detach().to(bias.dtype).double()
        error = max(error, (rounded - exact.bias.detach()).abs().max().item())
    return error
