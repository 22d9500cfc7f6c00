"""A complete third-party peftkit method in one file: a learned scale on each output feature.

y = s * (W x + b), with s initialised to ones, so the adapted model starts as the base model. It merges exactly
into the host: W <- diag(s) W and b <- s * b. Register it with ``peftkit.register_method`` (in a notebook or a
test) or ship it in a package under the ``peftkit.methods`` entry-point group:

    [project.entry-points."peftkit.methods"]
    scale = "my_package.scale_method:Scale"
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import ALL_RULES, Adapter, Capabilities, Method, MethodConfig
from peftkit.sites import WeightSite


class ScaleConfig(MethodConfig):
    method: Literal["scale"] = "scale"


class ScaleAdapter(Adapter):
    def __init__(self, site: WeightSite) -> None:
        super().__init__()
        self.site = site
        self.scale = nn.Parameter(torch.ones(site.out_features, device=site.device, dtype=site.dtype))

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out * self.scale  # the feature axis is last for Linear and Conv1D hosts

    def merge(self) -> None:
        self.site.scale_features_(self.scale)  # W <- diag(s) W, b <- s * b, in float32 or wider

    def unmerge(self) -> None:
        self.site.scale_features_(1.0 / self.scale.detach())


class Scale(Method):
    name = "scale"
    config = ScaleConfig
    capabilities = Capabilities(
        site="weight",
        module_types=(nn.Linear, Conv1D),
        mergeable=True,
        identity_at_init=True,
        compose_rules=ALL_RULES,  # a function of the host's output alone: it can be summed, stacked, gated
    )

    @classmethod
    def parameter_count(cls, config: ScaleConfig, site: WeightSite) -> int:
        return site.out_features

    @classmethod
    def create(cls, config: ScaleConfig, site: WeightSite) -> ScaleAdapter:
        return ScaleAdapter(site)
