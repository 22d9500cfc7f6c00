"""LoRA: Low-Rank Adaptation (Hu et al., 2021, arXiv:2106.09685), with rsLoRA scaling (Kalajdzievski, 2023).

The frozen weight W0 (d_out x d_in) gets a trainable low-rank update, eq. (3) of the paper:

    h = W0 x + (alpha / r) * B A x,      A: r x d_in,  B: d_out x r,  B = 0 at init

so training starts from the base model. rsLoRA scales by alpha / sqrt(r) instead, which keeps the update's
magnitude stable as r grows. The forward never builds W0 + BA: it runs ``A`` with the host's own operation (a
linear map, an embedding lookup, a strided convolution), then adds ``scale * B h`` into the host's output in place.
Merging adds the update, computed in float32, to the weight; unmerging subtracts it.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from peftkit import Adapter, Capabilities, Method, MethodConfig
from peftkit.method import ALL_RULES
from peftkit.sites import WeightSite, weight_site_types


class LoRAConfig(MethodConfig):
    method: Literal["lora"] = "lora"
    r: int = Field(default=8, gt=0, description="rank of the update")
    alpha: float = Field(default=16.0, gt=0, description="the update is scaled by alpha / r (alpha / sqrt(r))")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="dropout on the input of the LoRA path")
    rslora: bool = Field(default=False, description="scale by alpha / sqrt(r) (rank-stabilised LoRA)")
    init: Literal["kaiming", "gaussian"] = Field(default="kaiming", description="initialisation of A; B is 0")


class LoRAAdapter(Adapter):
    def __init__(self, config: LoRAConfig, site: WeightSite) -> None:
        super().__init__()
        self.site = site
        self.rank = config.r
        self.scaling = config.alpha / (math.sqrt(config.r) if config.rslora else config.r)
        self.dropout = 0.0 if site.input_is_index else config.dropout
        factory = {"device": site.device, "dtype": site.dtype}
        self.lora_a = nn.Parameter(torch.empty(config.r, site.in_features, **factory))
        self.lora_b = nn.Parameter(torch.zeros(site.out_features, config.r, **factory))
        # A meta tensor holds no values: initialising it would do nothing and cost ~0.3 ms per adapter (about half
        # of attaching to a meta model), so it is skipped; whoever materialises the model initialises it.
        if self.lora_a.is_meta:
            pass
        elif config.init == "kaiming":  # the same as nn.Linear's default initialisation
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_a, std=1.0 / config.r)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.dropout and self.training:  # no dropout copy of x when there is no dropout
            x = F.dropout(x, self.dropout, training=True)
        h = self.site.project_in(x, self.lora_a)  # "... d_in -> ... r"
        return self.site.project_out_(out, h, self.lora_b, self.scaling)  # out += scaling * h @ B.T

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A as a (d_out, d_in) matrix in float32, or float64 for a float64 model."""
        dtype = torch.promote_types(self.lora_a.dtype, torch.float32)
        return (self.lora_b.to(dtype) @ self.lora_a.to(dtype)).mul_(self.scaling)

    def merge(self) -> None:
        self.site.add_to_weight_(self.delta_weight())

    def unmerge(self) -> None:
        self.site.add_to_weight_(-self.delta_weight())


class LoRA(Method):
    name = "lora"
    config = LoRAConfig
    capabilities = Capabilities(
        site="weight",
        module_types=weight_site_types(),
        mergeable=True,
        identity_at_init=True,
        routable=True,
        commutes=True,
        compose_rules=ALL_RULES,
        combinable=True,
    )

    @classmethod
    def route(
        cls, adapters: list[LoRAAdapter | None], index: torch.Tensor, x: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor | None:
        """Each example with its own adapter in two batched matmuls: the adapters' A and (scaled) B are stacked,
        zero-padded to the largest rank, and gathered per example; rows routed to no adapter gather zeros.
        Returns None (the core then runs each adapter on its rows) where the host is not a feature-last map."""
        present = [a for a in adapters if a is not None]
        site = present[0].site
        if site.input_is_index or type(site).project_in is not WeightSite.project_in:
            return None
        if len({a.dropout for a in present}) > 1:
            return None
        rank = max(a.rank for a in present)
        d_in, d_out = site.in_features, site.out_features
        like = {"device": x.device, "dtype": x.dtype}
        a_stack = torch.stack(  # "n r i"
            [
                F.pad(a.lora_a.to(x.dtype), (0, 0, 0, rank - a.rank)) if a else torch.zeros(rank, d_in, **like)
                for a in adapters
            ]
        )
        b_stack = torch.stack(  # "n o r", the scaling folded into the small factor
            [
                F.pad(a.lora_b.to(x.dtype) * a.scaling, (0, rank - a.rank)) if a else torch.zeros(d_out, rank, **like)
                for a in adapters
            ]
        )
        rows = x.reshape(x.shape[0], -1, d_in)  # "b ... i -> b s i"
        if present[0].dropout and present[0].training:
            rows = F.dropout(rows, present[0].dropout, training=True)
        h = torch.bmm(rows, a_stack[index].transpose(1, 2))  # "b s i, b i r -> b s r"
        update = torch.bmm(h, b_stack[index].transpose(1, 2))  # "b s r, b r o -> b s o"
        return out + update.reshape(out.shape).to(out.dtype)

    @classmethod
    def parameter_count(cls, config: LoRAConfig, site: WeightSite) -> int:
        return config.r * (site.in_features + site.out_features)

    @classmethod
    def create(cls, config: LoRAConfig, site: WeightSite) -> LoRAAdapter:
        return LoRAAdapter(config, site)

    # -- peftkit.combine hooks: the update is scaling * B A, a matrix of rank at most r ---------------------------
    @classmethod
    def weight_delta(cls, adapter: LoRAAdapter) -> torch.Tensor:
        return adapter.delta_weight()

    @classmethod
    def delta_rank(cls, config: LoRAConfig) -> int:
        return config.r

    @classmethod
    def low_rank_config(cls, like: LoRAConfig, target: list[str], rank: int) -> LoRAConfig:
        """alpha = r and no rsLoRA, so scaling = 1 and B A is the update itself; dropout and init follow ``like``."""
        return LoRAConfig(target=target, r=rank, alpha=float(rank), dropout=like.dropout, init=like.init)

    @classmethod
    def load_low_rank_(cls, adapter: LoRAAdapter, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> None:
        """B = U sqrt(S) / scaling, A = sqrt(S) Vh: the singular values split evenly, so A and B have equal norms
        (neither factor starts near zero if training continues). Ranks below r leave the extra rows/columns 0."""
        root = s.sqrt()
        k = s.shape[0]
        with torch.no_grad():
            adapter.lora_a.zero_()
            adapter.lora_b.zero_()
            adapter.lora_a[:k].copy_(root[:, None] * vh)  # "k, k i -> k i"
            adapter.lora_b[:, :k].copy_(u * (root / adapter.scaling))  # "o k, k -> o k"
