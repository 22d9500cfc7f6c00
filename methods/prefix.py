"""Prefix tuning (Li & Liang, 2021, arXiv:2101.00190), optionally gated as in LLaMA-Adapter (Zhang et al., 2023).

Each chosen attention layer gets ``length`` learned key and value vectors per key/value head, prepended to the
keys and values every query attends to:

    attention(Q, [P_k; K], [P_v; V])

They are added after the KV cache update and the rotary embedding (see ``peftkit.sites.attention``), so they are
not cached, carry no position, and real tokens keep theirs. Li & Liang train the prefix through a
reparametrisation, ``P = MLP(E)`` with a smaller embedding E (sec. 4.3); ``reparametrize: true`` does that and
``peftkit.fold`` replaces the MLP by the plain prefixes it produces, for inference and saving.

Plain prefix tuning changes the output from the first step, so it declares ``identity_at_init = False``. With
``gate: true`` the prefix is attended to separately and added through a per-head gate ``tanh(g)``, g = 0 at init
(LLaMA-Adapter's zero-init attention, eq. 7-8), which makes the adapter an identity at init.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from peftkit import Adapter, Capabilities, Method, MethodConfig
from peftkit.sites.attention import AttentionSite, check_extra_keys, prepend_keys


class PrefixConfig(MethodConfig):
    method: Literal["prefix"] = "prefix"
    target: str | list[str] = Field(default_factory=lambda: ["@self_attention"])
    length: int = Field(default=10, gt=0, description="prefix positions per layer")
    reparametrize: bool = Field(default=False, description="train P = MLP(E) (Li & Liang sec. 4.3); fold it later")
    encoder_hidden: int = Field(default=128, gt=0, description="hidden width of the reparametrisation MLP")
    gate: bool = Field(default=False, description="zero-initialised per-head gate: identity at init")
    init_std: float = Field(default=0.02, gt=0.0, description="std of the random initial prefixes")


class PrefixAdapter(Adapter):
    def __init__(self, config: PrefixConfig, site: AttentionSite) -> None:
        super().__init__()
        self.length = config.length
        self.shape = (site.num_kv_heads, config.length, site.head_dim)  # "h p d", keys and values alike
        factory = {"device": site.device, "dtype": site.dtype}
        self.prefix_keys = self.prefix_values = None
        self.prefix_embedding = self.encoder = None
        if config.reparametrize:
            self.prefix_embedding = nn.Parameter(
                torch.randn(config.length, site.hidden_size, **factory) * config.init_std
            )
            self.encoder = nn.Sequential(
                nn.Linear(site.hidden_size, config.encoder_hidden, **factory),
                nn.Tanh(),
                nn.Linear(config.encoder_hidden, 2 * site.num_kv_heads * site.head_dim, **factory),
            )
        else:
            self.prefix_keys = nn.Parameter(torch.randn(self.shape, **factory) * config.init_std)
            self.prefix_values = nn.Parameter(torch.randn(self.shape, **factory) * config.init_std)
        self.gate = nn.Parameter(torch.zeros(site.num_heads, **factory)) if config.gate else None
        self.num_heads = site.num_heads
        context = getattr(site, "context", None)  # set by targeting: where the host sits, for error messages
        self.where = f"prefix on {getattr(context, 'path', type(site.module).__name__)!r}"

    def prefixes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values, each (kv_heads, length, head_dim)."""
        if self.encoder is None:
            return self.prefix_keys, self.prefix_values
        heads, length, dim = self.shape
        both = self.encoder(self.prefix_embedding)  # "p hidden -> p (2 h d)"
        keys, values = both.view(length, 2, heads, dim).permute(1, 2, 0, 3)  # "p two h d -> two h p d"
        return keys, values

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: Any,
        *,
        module: nn.Module,
        inner,
        **kwargs,
    ) -> tuple[torch.Tensor, Any]:
        batch = query.shape[0]
        keys, values = (t.to(key.dtype).unsqueeze(0).expand(batch, -1, -1, -1) for t in self.prefixes())
        if self.gate is None:
            key, value, mask, kwargs = prepend_keys(module, query, key, value, mask, kwargs, keys, values, self.where)
            return inner(query, key, value, mask, **kwargs)
        check_extra_keys(self.where, query, key, value, keys, values, None)
        out, weights = inner(query, key, value, mask, **kwargs)  # "b s h d"
        groups = self.num_heads // keys.shape[1]
        keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
        prefix_out = F.scaled_dot_product_attention(query, keys, values, scale=kwargs.get("scaling"))  # "b h s d"
        gate = torch.tanh(self.gate).to(out.dtype)[None, None, :, None]
        return out + gate * prefix_out.transpose(1, 2), weights

    def fold(self) -> dict[str, Any]:
        """Replace the reparametrisation by the plain prefixes it produces; returns the config fields that changed."""
        if self.encoder is None:
            return {}
        with torch.no_grad():
            keys, values = (t.detach().clone().contiguous() for t in self.prefixes())
        self.prefix_keys, self.prefix_values = nn.Parameter(keys), nn.Parameter(values)
        self.prefix_embedding = self.encoder = None
        return {"reparametrize": False}


class Prefix(Method):
    name = "prefix"
    config = PrefixConfig
    capabilities = Capabilities(
        site="attention", module_types=(nn.Module,), mergeable=False, identity_at_init=True, compose_rules=frozenset()
    )

    @classmethod
    def capabilities_for(cls, config: PrefixConfig) -> Capabilities:
        return dataclasses.replace(cls.capabilities, identity_at_init=config.gate)

    @classmethod
    def parameter_count(cls, config: PrefixConfig, site: AttentionSite) -> int:
        gate = site.num_heads if config.gate else 0
        prefix = 2 * site.num_kv_heads * site.head_dim
        if not config.reparametrize:
            return config.length * prefix + gate
        hidden, width = site.hidden_size, config.encoder_hidden
        return config.length * hidden + hidden * width + width + width * prefix + prefix + gate

    @classmethod
    def create(cls, config: PrefixConfig, site: AttentionSite) -> PrefixAdapter:
        return PrefixAdapter(config, site)

    # -- HF PEFT checkpoints (peftkit.from_peft / peftkit.to_peft) ------------------------------------------------
    # PEFT holds one table, prompt_embeddings (length, num_layers * 2 * token_dim) with token_dim = kv_heads *
    # head_dim, viewed as "p (l two h d)": layer l's keys are two = 0, its values two = 1. peftkit holds per layer
    # prefix_keys and prefix_values, each "h p d". Every attention layer has a prefix in PEFT, so an export must
    # cover all of them; PEFT's prefix_projection (one MLP shared by all layers) has no peftkit form and is refused.
    peft_type = "PREFIX_TUNING"

    @classmethod
    def _peft_layers(cls, model: nn.Module, length: int) -> list[str]:
        from peftkit.lifecycle.attach import plan

        return [row.path for row in plan(model, {"adapters": {"x": [{"method": "prefix", "length": length}]}}).rows]

    @classmethod
    def from_peft(
        cls, peft_config: dict, tensors: dict[str, torch.Tensor], model: nn.Module, adapter_name: str
    ) -> tuple[list[dict], dict[str, torch.Tensor]]:
        from peftkit.errors import CheckpointError
        from peftkit.interop.peft import peft_field, peftkit_key, refuse_features

        refuse_features(peft_config, {"prefix_projection": False, "num_transformer_submodules": 1})
        if set(tensors) != {"prompt_embeddings"}:
            raise CheckpointError(f"a PEFT prefix-tuning file holds only 'prompt_embeddings', found {sorted(tensors)}")
        table = tensors["prompt_embeddings"]  # "p (l two h d)"
        length = peft_field(peft_config, "num_virtual_tokens", "count")
        heads = peft_field(peft_config, "num_attention_heads", "count")
        layers = cls._peft_layers(model, length)
        if table.dim() != 2 or table.shape[0] != length or table.shape[1] % (2 * len(layers) * heads):
            raise CheckpointError(
                f"prompt_embeddings {list(table.shape)} does not fit {length} virtual tokens on the model's "
                f"{len(layers)} attention layers with {heads} key/value heads"
            )
        both = table.reshape(length, len(layers), 2, heads, -1).permute(1, 2, 3, 0, 4)  # "l two h p d"
        state = {}
        for index, path in enumerate(layers):
            state[peftkit_key(path, adapter_name, "prefix_keys")] = both[index, 0]
            state[peftkit_key(path, adapter_name, "prefix_values")] = both[index, 1]
        return [{"method": "prefix", "target": layers, "length": length}], state

    @classmethod
    def to_peft(cls, attached: list, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
        from peftkit.errors import CheckpointError

        for a in attached:
            if a.config.gate or a.module.encoder is not None:
                raise CheckpointError(
                    "PEFT prefix tuning has no gate and no per-layer reparametrisation: export a plain prefix "
                    "(peftkit.fold folds a reparametrised one)"
                )
        by_path = {a.path: a.module for a in attached}
        length = attached[0].module.length
        layers = cls._peft_layers(model, length)
        if sorted(by_path) != sorted(layers) or len({m.length for m in by_path.values()}) != 1:
            raise CheckpointError(
                f"PEFT prefix tuning puts one prefix length on every attention layer {layers}; this adapter covers "
                f"{sorted(by_path)} with lengths {sorted({m.length for m in by_path.values()})}"
            )
        heads, _, dim = by_path[layers[0]].shape
        both = torch.stack([torch.stack(by_path[p].prefixes()) for p in layers])  # "l two h p d"
        table = both.permute(3, 0, 1, 2, 4).reshape(length, -1)  # "l two h p d -> p (l two h d)"
        config = {
            "num_virtual_tokens": length,
            "num_layers": len(layers),
            "num_attention_heads": heads,
            "token_dim": heads * dim,
            "encoder_hidden_size": heads * dim,
            "num_transformer_submodules": 1,
            "prefix_projection": False,
        }
        return config, {"prompt_embeddings": table}
