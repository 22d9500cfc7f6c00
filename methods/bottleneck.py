"""Bottleneck adapters: Houlsby (2019), Pfeiffer (2020) and the parallel adapter (He et al., 2022).

Each adapter is a small residual MLP, ``h -> h + s * up(act(down(LN(h))))``, with ``up`` initialised to zero so
the adapted model starts as the base model:

- **Houlsby** et al., "Parameter-Efficient Transfer Learning for NLP" (ICML 2019), Fig. 2: one adapter after the
  attention output projection and one after the feed-forward output projection of each chosen layer, before the
  residual add and layer norm.
- **Pfeiffer** et al., "AdapterFusion" (EACL 2021), sec. 3.1 / "MAD-X": one adapter after the feed-forward block.
- **Parallel** (He et al., "Towards a Unified View of Parameter-Efficient Transfer Learning", ICLR 2022, eq. 7):
  computed from the sub-layer's *input* and added to its output, ``h_out = f(x) + s * up(act(down(x)))``, with
  s = 4 as in the paper's best FFN variant.

They add depth, so they add latency and cannot be merged into the base weights (declared: ``mergeable=False``).
Placement uses the family table (``@attention_output``, ``@ffn_output``, ``@ffn``), so it needs no per-model class;
explicit module paths work for any model.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from peftkit import ALL_RULES, Adapter, Capabilities, Method, MethodConfig
from peftkit.sites.sublayer import SublayerSite

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU, "swish": nn.SiLU}


class BottleneckConfig(MethodConfig):
    bottleneck: int | None = Field(default=None, gt=0, description="bottleneck width; or use reduction_factor")
    reduction_factor: float | None = Field(
        default=None, ge=1 / 64, description="width = hidden size / reduction_factor (at most 64x the hidden size)"
    )
    activation: Literal["relu", "gelu", "tanh", "silu", "swish"] = "relu"
    layer_norm: bool = Field(default=False, description="a LayerNorm on the adapter's input")
    scaling: float = Field(default=1.0, description="s in h + s * up(...)")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="dropout on the bottleneck activation")

    @model_validator(mode="after")
    def _one_width(self) -> BottleneckConfig:
        if self.bottleneck is not None and self.reduction_factor is not None:
            raise ValueError("give either bottleneck or reduction_factor, not both")
        return self

    def width(self, hidden: int) -> int:
        if self.bottleneck is not None:
            return self.bottleneck
        return max(1, int(hidden // (self.reduction_factor or 16.0)))


class HoulsbyConfig(BottleneckConfig):
    method: Literal["houlsby"] = "houlsby"
    target: str | list[str] = Field(default_factory=lambda: ["@attention_output", "@ffn_output"])


class PfeifferConfig(BottleneckConfig):
    method: Literal["pfeiffer"] = "pfeiffer"
    target: str | list[str] = Field(default_factory=lambda: ["@ffn_output"])


class ParallelConfig(BottleneckConfig):
    method: Literal["parallel"] = "parallel"
    target: str | list[str] = Field(default_factory=lambda: ["@ffn"])
    scaling: float = Field(default=4.0, description="s in f(x) + s * up(...); 4 in He et al.")


class BottleneckAdapter(Adapter):
    def __init__(self, config: BottleneckConfig, site: SublayerSite) -> None:
        super().__init__()
        self.site = site
        self.parallel = site.kind == "parallel"
        features_in = site.in_features if self.parallel else site.out_features
        width = config.width(site.out_features)
        factory = {"device": site.device, "dtype": site.dtype}
        self.layer_norm = nn.LayerNorm(features_in, **factory) if config.layer_norm else None
        self.down = nn.Linear(features_in, width, **factory)
        self.activation = ACTIVATIONS[config.activation]()
        self.dropout = nn.Dropout(config.dropout) if config.dropout else None
        self.up = nn.Linear(width, site.out_features, **factory)
        nn.init.zeros_(self.up.weight)  # identity at init
        nn.init.zeros_(self.up.bias)
        self.scaling = config.scaling

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        source = self.site.sublayer_input(x) if self.parallel else out
        # the stream may be wider than the adapter (float32 activations around bfloat16-compute quantised layers)
        source = source.to(self.down.weight.dtype)
        if self.layer_norm is not None:
            source = self.layer_norm(source)
        hidden = self.activation(self.down(source))  # "... d -> ... width"
        if self.dropout is not None:
            hidden = self.dropout(hidden)
        # one fused scaled add, not in place: for a sequential adapter `out` is saved by down
        return torch.add(out, self.up(hidden).to(out.dtype), alpha=self.scaling)


class _Bottleneck(Method):
    """What the three placements share: the adapter, its parameter count, and what it can do."""

    @classmethod
    def parameter_count(cls, config: BottleneckConfig, site: SublayerSite) -> int:
        features_in = site.in_features if site.kind == "parallel" else site.out_features
        width = config.width(site.out_features)
        norm = 2 * features_in if config.layer_norm else 0
        return norm + features_in * width + width + width * site.out_features + site.out_features

    @classmethod
    def create(cls, config: BottleneckConfig, site: SublayerSite) -> BottleneckAdapter:
        return BottleneckAdapter(config, site)


def _capabilities(site: Literal["output", "parallel"]) -> Capabilities:
    return Capabilities(
        site=site,
        module_types=(nn.Module,),
        mergeable=False,
        identity_at_init=True,
        commutes=False,
        compose_rules=ALL_RULES,
    )


class Houlsby(_Bottleneck):
    name = "houlsby"
    config = HoulsbyConfig
    capabilities = _capabilities("output")


class Pfeiffer(_Bottleneck):
    name = "pfeiffer"
    config = PfeifferConfig
    capabilities = _capabilities("output")


class Parallel(_Bottleneck):
    name = "parallel"
    config = ParallelConfig
    capabilities = _capabilities("parallel")
