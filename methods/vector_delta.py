"""What BitFit and LayerNorm tuning share: a trainable delta beside each targeted vector of a module (a bias, a
norm's scale or shift), zero at init, so the adapted module computes with ``v + δ`` while the base's ``v`` never
changes; the vector site puts ``v + δ`` in place for the module's own forward, and merging adds δ to ``v``."""

from __future__ import annotations

import torch
from torch import nn

from peftkit import Adapter
from peftkit.sites import VectorsSite, widened


class VectorDeltaAdapter(Adapter):
    def __init__(self, site: VectorsSite) -> None:
        super().__init__()
        self.site = site
        self.deltas = nn.ParameterDict(
            {p.name: nn.Parameter(torch.zeros(p.size, device=site.device, dtype=site.dtype)) for p in site.parameters}
        )

    def parameter_delta(self, name: str) -> torch.Tensor:
        """What the vector site adds to parameter ``name`` for the module's forward."""
        return self.deltas[name]

    def merge(self) -> None:
        for name, delta in self.deltas.items():
            self.site.add_to_parameter_(name, widened(delta.detach()))

    def unmerge(self) -> None:
        for name, delta in self.deltas.items():
            self.site.add_to_parameter_(name, -widened(delta.detach()))


def vector_count(site: VectorsSite) -> int:
    """The parameters of a delta beside every targeted vector of the site."""
    return sum(p.size for p in site.parameters)
