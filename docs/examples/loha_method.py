"""A third-party method whose update is dense: LoHa, the low-rank Hadamard product (Hyeon-Woo et al., 2022,
FedPara, arXiv:2108.06098; the LyCORIS LoHa).

    dW = (alpha / r) * (B1 A1) ⊙ (B2 A2),   A_i: r x d_in,  B_i: d_out x r,  B2 = 0 at init

The elementwise product of two rank-r matrices has rank up to r², for the parameters of two rank-r factors. It is
not a thin product, so the forward asks the host to run its own operation with the whole update
(``site.add_dense_update_``) instead of ``project_in``/``project_out_``; the merge builds the same update in float32
or wider (``widened``) and adds it to the weight. Every host a weight site knows works: linear, GPT-2's Conv1D,
embeddings, convolutions.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from peftkit import ALL_RULES, Adapter, Capabilities, Method, MethodConfig
from peftkit.sites import WeightSite, weight_site_types, widened


class LoHaConfig(MethodConfig):
    method: Literal["loha"] = "loha"
    r: int = Field(default=8, gt=0, description="rank of each of the two factors")
    alpha: float = Field(default=8.0, gt=0, description="the update is scaled by alpha / r")


class LoHaAdapter(Adapter):
    def __init__(self, config: LoHaConfig, site: WeightSite) -> None:
        super().__init__()
        self.site = site
        self.scaling = config.alpha / config.r
        like = {"device": site.device, "dtype": site.dtype}
        self.a1, self.a2 = (nn.Parameter(torch.empty(config.r, site.in_features, **like)) for _ in range(2))
        self.b1 = nn.Parameter(torch.empty(site.out_features, config.r, **like))
        self.b2 = nn.Parameter(torch.zeros(site.out_features, config.r, **like))  # dW = 0: starts as the base
        if site.device.type != "meta":
            for factor in (self.a1, self.a2, self.b1):
                nn.init.normal_(factor, std=0.1)

    def delta_weight(self, wide: bool = False) -> torch.Tensor:
        """The unscaled (d_out, d_in) update; ``wide``: in float32 or wider, for merging."""
        a1, a2, b1, b2 = (widened(t) if wide else t for t in (self.a1, self.a2, self.b1, self.b2))
        return (b1 @ a1) * (b2 @ a2)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self.site.add_dense_update_(out, x, self.delta_weight(), self.scaling)

    def merge(self) -> None:
        self.site.add_to_weight_(self.delta_weight(wide=True) * self.scaling)

    def unmerge(self) -> None:
        self.site.add_to_weight_(-self.delta_weight(wide=True) * self.scaling)


class LoHa(Method):
    name = "loha"
    config = LoHaConfig
    capabilities = Capabilities(
        site="weight", module_types=weight_site_types(), mergeable=True, identity_at_init=True, compose_rules=ALL_RULES
    )

    @classmethod
    def parameter_count(cls, config: LoHaConfig, site: WeightSite) -> int:
        return 2 * config.r * (site.in_features + site.out_features)

    @classmethod
    def create(cls, config: LoHaConfig, site: WeightSite) -> LoHaAdapter:
        return LoHaAdapter(config, site)
