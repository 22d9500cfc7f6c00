"""The table of site kinds: each kind of place an adapter can act at, and the function that builds such a site.

A method's capabilities name its kind (``weight``, ``output``, ``parallel``, ``attention``, ``input``, ``parameter``); targeting
asks :func:`make_site` for a site of that kind on each candidate host and gets a site or a sentence saying why the
host cannot have one. Each kind's module registers itself here, so a new kind is one module and one
:func:`register_site_kind` call, and nothing here imports a kind.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from peftkit.sites.placements import Places

SiteFactory = Callable[[nn.Module, "SiteContext | None"], Any]  # returns a site, or a str saying why not
_KINDS: dict[str, SiteFactory] = {}
_BY_PARAMETER: set[str] = set()  # kinds whose targets are parameter paths (``<module path>.<parameter name>``)


@dataclass(frozen=True)
class SiteContext:
    """Where a host sits: its path, the model's modules by path, and where the model's named places are; for a
    ``parameter`` site, the names of the host's parameters the entry targets."""

    path: str
    modules: Mapping[str, nn.Module]
    places: Places | None
    root: nn.Module | None = None
    parameters: tuple[str, ...] = ()

    @property
    def family(self) -> str | None:
        return self.places.family if self.places is not None else None


def register_site_kind(kind: str, factory: SiteFactory, *, by_parameter: bool = False) -> None:
    """Make ``kind`` available to methods; ``factory(module, context)`` returns a site or a reason it cannot.
    ``by_parameter``: an entry of this kind targets parameters by path, and the site gets the targeted names of its
    module in ``context.parameters``."""
    _KINDS[kind] = factory
    if by_parameter:
        _BY_PARAMETER.add(kind)


def targets_parameters(kind: str) -> bool:
    """Whether entries of site kind ``kind`` select parameters (by path) rather than modules."""
    return kind in _BY_PARAMETER


def site_kinds() -> list[str]:
    return sorted(_KINDS)


def make_site(kind: str, module: nn.Module, context: SiteContext | None = None) -> Any:
    """The site of ``kind`` on ``module``, or a sentence saying why the module cannot host one."""
    factory = _KINDS.get(kind)
    if factory is None:
        return f"site kind {kind!r} is not available in this version of peftkit; kinds: {', '.join(site_kinds())}"
    return factory(module, context)


def device_and_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where and in which dtype an adapter for ``module`` is built: its first floating-point parameter's; for a
    module whose weights are all packed integers (quantised linears), the ``compute_dtype`` its layers declare, else
    float32. An adapter never lives in a storage dtype such as uint8."""
    parameters = list(module.parameters())
    floating = next((p for p in parameters if p.is_floating_point()), None)
    if floating is not None:
        return floating.device, floating.dtype
    declared = (getattr(m, "compute_dtype", None) for m in module.modules())
    dtype = next((d for d in declared if isinstance(d, torch.dtype)), torch.float32)
    return parameters[0].device, dtype
