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

from peftkit import Adapter, Capabilities, Method, MethodConfig
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
        self._rescale(self.scale.detach())

    def unmerge(self) -> None:
        self._rescale(1.0 / self.scale.detach())

    def _rescale(self, factor: torch.Tensor) -> None:
        """Multiply the host's rows (and bias) by ``factor``, computing the change in float32 or better."""
        factor = factor.to(torch.promote_types(factor.dtype, torch.float32))
        weight = self.site.weight_as_matrix().to(factor.dtype)  # (out_features, in_features)
        self.site.add_to_weight_((factor[:, None] - 1.0) * weight)
        bias = getattr(self.site.module, "bias", None)
        if bias is not None:
            with torch.no_grad():
                bias.copy_((bias.to(factor.dtype) * factor).to(bias.dtype))


class Scale(Method):
    name = "scale"
    config = ScaleConfig
    capabilities = Capabilities(
        site="weight",
        module_types=(nn.Linear, Conv1D),
        mergeable=True,
        identity_at_init=True,
    )

    @classmethod
    def parameter_count(cls, config: ScaleConfig, site: WeightSite) -> int:
        return site.out_features

    @classmethod
    def create(cls, config: ScaleConfig, site: WeightSite) -> ScaleAdapter:
        return ScaleAdapter(site)
