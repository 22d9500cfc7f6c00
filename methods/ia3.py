"""IA3: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al., 2022, arXiv:2205.05638, sec. 3.3).

Learned vectors rescale the attention keys and values and the feed-forward intermediate activation:

    k <- l_k ⊙ k,    v <- l_v ⊙ v,    FFN: W_down (l_ff ⊙ act(W_up x))

each initialised to ones, so the adapted model starts as the base model. Where the vector scales a projection's
output (k, v) it merges as ``W <- diag(l) W, b <- l ⊙ b``; where it scales the input of the feed-forward output
projection it merges as ``W <- W diag(l)``. Which targets are scaled on the input is the ``feedforward`` field
(by default the family's ``@ffn_output``). On GPT-2, whose q, k and v share one fused projection, ``@key`` and
``@value`` are that projection, so its whole output is scaled (as HF PEFT does).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import Adapter, Capabilities, Method, MethodConfig
from peftkit.method import ALL_RULES
from peftkit.sites import WeightSite
from peftkit.targeting import compile_pattern


class IA3Config(MethodConfig):
    method: Literal["ia3"] = "ia3"
    target: str | list[str] = Field(default_factory=lambda: ["@key", "@value", "@ffn_output"])
    feedforward: list[str] = Field(
        default_factory=lambda: ["@ffn_output"], description="targets whose input (not output) is scaled"
    )


def _scales_input(config: IA3Config, site: WeightSite) -> bool:
    context = site.context
    return any(compile_pattern(pattern, context.family)(context.path) for pattern in config.feedforward)


class IA3Adapter(Adapter):
    def __init__(self, config: IA3Config, site: WeightSite) -> None:
        super().__init__()
        self.site = site
        self.transforms_input = _scales_input(config, site)
        size = site.in_features if self.transforms_input else site.out_features
        self.ia3_scale = nn.Parameter(torch.ones(size, device=site.device, dtype=site.dtype))

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.ia3_scale

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out if self.transforms_input else out * self.ia3_scale

    def merge(self) -> None:
        self._rescale(self.ia3_scale.detach())

    def unmerge(self) -> None:
        self._rescale(1.0 / self.ia3_scale.detach())

    def _rescale(self, factor: torch.Tensor) -> None:
        factor = factor.to(torch.promote_types(factor.dtype, torch.float32))
        weight = self.site.weight_as_matrix().to(factor.dtype)  # (out_features, in_features)
        if self.transforms_input:
            self.site.add_to_weight_(weight * (factor - 1.0)[None, :])
            return
        self.site.add_to_weight_(weight * (factor - 1.0)[:, None])
        bias = getattr(self.site.module, "bias", None)
        if bias is not None:
            with torch.no_grad():
                bias.copy_((bias.to(factor.dtype) * factor).to(bias.dtype))


class IA3(Method):
    name = "ia3"
    config = IA3Config
    capabilities = Capabilities(
        site="weight", module_types=(nn.Linear, Conv1D), mergeable=True, identity_at_init=True, compose_rules=ALL_RULES
    )

    @classmethod
    def parameter_count(cls, config: IA3Config, site: WeightSite) -> int:
        return site.in_features if _scales_input(config, site) else site.out_features

    @classmethod
    def create(cls, config: IA3Config, site: WeightSite) -> IA3Adapter:
        return IA3Adapter(config, site)
