"""LoHa: the low-rank Hadamard product (Hyeon-Woo et al., 2022, FedPara, arXiv:2108.06098; LyCORIS's LoHa).

    dW = (alpha / r) * (B1 A1) ⊙ (B2 A2),   A_i: r x d_in,  B_i: d_out x r,  A2 = 0 at init

The elementwise product of two rank-r matrices has rank up to r², for the parameters of two rank-r factors
(2 r (d_in + d_out)). It is not a thin product, so the forward asks the host to run its own operation with the
whole update (``site.add_dense_update_``) instead of ``project_in``/``project_out_``; the merge builds the same
update in float32 or wider (``widened``) and adds it to the weight. Every host a weight site knows works: linear,
GPT-2's Conv1D, embeddings, convolutions (flattened to out x in·kh·kw).

As LyCORIS and HF PEFT do, B1, A1 and B2 start Kaiming-uniform and A2 at zero, and two regularisers act while
training: ``rank_dropout`` zeroes whole rows of dW (rescaled by the share kept) and ``module_dropout`` skips the
adapter for a whole forward. HF PEFT's LOHA checkpoints (``hada_w1_a`` = B1, ``hada_w1_b`` = A1, ``hada_w2_a`` =
B2, ``hada_w2_b`` = A2) load and export for linear hosts, the ones PEFT's LoHa adapts in both libraries' layout.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from peftkit_methods.dense_update import DenseUpdateAdapter
from pydantic import Field
from torch import nn

from peftkit import ALL_RULES, Capabilities, Method, MethodConfig
from peftkit.sites import WeightSite, weight_site_types, widened


class LoHaConfig(MethodConfig):
    method: Literal["loha"] = "loha"
    r: int = Field(default=8, gt=0, description="rank of each of the two factors (the update's rank is up to r²)")
    alpha: float = Field(default=8.0, gt=0, description="the update is scaled by alpha / r")
    rank_dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="training: drop rows of dW with this chance")
    module_dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="training: skip the adapter this often")


class LoHaAdapter(DenseUpdateAdapter):
    def __init__(self, config: LoHaConfig, site: WeightSite) -> None:
        super().__init__()
        self.site = site
        self.scaling = config.alpha / config.r
        self.rank_dropout, self.module_dropout = config.rank_dropout, config.module_dropout
        like = {"device": site.device, "dtype": site.dtype}
        self.b1 = nn.Parameter(torch.empty(site.out_features, config.r, **like))
        self.a1 = nn.Parameter(torch.empty(config.r, site.in_features, **like))
        self.b2 = nn.Parameter(torch.empty(site.out_features, config.r, **like))
        self.a2 = nn.Parameter(torch.zeros(config.r, site.in_features, **like))  # dW = 0: starts as the base
        if site.device.type != "meta":
            for factor in (self.b1, self.a1, self.b2):
                nn.init.kaiming_uniform_(factor, a=math.sqrt(5))

    def delta_weight(self, wide: bool = False) -> torch.Tensor:
        """The unscaled (d_out, d_in) update; ``wide``: in float32 or wider, for merging."""
        b1, a1, b2, a2 = (widened(t) if wide else t for t in (self.b1, self.a1, self.b2, self.a2))
        return (b1 @ a1) * (b2 @ a2)


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

    # -- HF PEFT checkpoints (peftkit.from_peft / peftkit.to_peft) ------------------------------------------------
    peft_type = "LOHA"
    _PEFT_FACTORS = {"hada_w1_a": "b1", "hada_w1_b": "a1", "hada_w2_a": "b2", "hada_w2_b": "a2"}
    _PEFT_UNSUPPORTED = {"use_effective_conv2d": False, "layers_to_transform": None, "modules_to_save": None}

    @classmethod
    def from_peft(
        cls, peft_config: dict, tensors: dict[str, torch.Tensor], model: nn.Module, adapter_name: str
    ) -> tuple[list[dict], dict[str, torch.Tensor]]:
        from peftkit.errors import CheckpointError
        from peftkit.interop.peft import peft_field, peftkit_key, rank_and_alpha, refuse_features, split_peft_key

        refuse_features(peft_config, cls._PEFT_UNSUPPORTED)
        factors: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            path, suffix = split_peft_key(key, tuple(cls._PEFT_FACTORS))
            factors.setdefault(path, {})[cls._PEFT_FACTORS[suffix]] = tensor
        groups: dict[tuple[int, float], list[str]] = {}
        state: dict[str, torch.Tensor] = {}
        for path, held in factors.items():
            missing = sorted(set(cls._PEFT_FACTORS.values()) - set(held))
            if missing:
                raise CheckpointError(f"LoHa module {path!r} lacks factors {missing} in the PEFT file")
            b1, a1, b2, a2 = held["b1"], held["a1"], held["b2"], held["a2"]
            rank, alpha = rank_and_alpha(peft_config, path, "alpha")
            shapes_fit = all(t.dim() == 2 for t in (b1, a1, b2, a2)) and b1.shape == b2.shape and a1.shape == a2.shape
            if not shapes_fit or b1.shape[1] != rank or a1.shape[0] != rank:
                shapes = {name: list(held[name].shape) for name in ("b1", "a1", "b2", "a2")}
                raise CheckpointError(f"LoHa on {path!r}: factors {shapes} do not give rank {rank}")
            groups.setdefault((rank, alpha), []).append(path)
            for name in ("b1", "a1", "b2", "a2"):
                state[peftkit_key(path, adapter_name, name)] = held[name]
        if not groups:
            raise CheckpointError("the PEFT LoHa checkpoint holds no LoHa tensors")
        dropouts = {
            "rank_dropout": float(peft_field(peft_config, "rank_dropout", "number", 0.0)),
            "module_dropout": float(peft_field(peft_config, "module_dropout", "number", 0.0)),
        }
        entries = [
            {"method": cls.name, "target": paths, "r": rank, "alpha": alpha, **dropouts}
            for (rank, alpha), paths in groups.items()
        ]
        return entries, state

    @classmethod
    def to_peft(cls, attached: list, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
        from peftkit.errors import CheckpointError
        from peftkit.interop.peft import peft_key, rank_and_alpha_fields, refuse_unless_linear_hosts

        refuse_unless_linear_hosts(attached, "LoHa")
        for field in ("rank_dropout", "module_dropout"):
            if len({getattr(a.config, field) for a in attached}) > 1:
                raise CheckpointError(f"a PEFT LoHa adapter has one {field}; this adapter's entries differ in it")
        ranks = {a.path: a.config.r for a in attached}
        names = {ours: theirs for theirs, ours in cls._PEFT_FACTORS.items()}
        tensors = {peft_key(a.path, names[n]): getattr(a.module, n) for a in attached for n in ("b1", "a1", "b2", "a2")}
        config = {
            **rank_and_alpha_fields(ranks, {a.path: a.config.alpha for a in attached}, "alpha"),
            "target_modules": sorted(ranks),
            "rank_dropout": attached[0].config.rank_dropout,
            "module_dropout": attached[0].config.module_dropout,
            "use_effective_conv2d": False,
            "init_weights": True,
        }
        return config, tensors
