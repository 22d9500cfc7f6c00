"""LoRA on fused mixture-of-experts parameters: one low-rank update per expert (``method: lora-experts``).

transformers 5 stores a layer's E experts in 3-D parameters (Qwen3-MoE: ``mlp.experts.gate_up_proj`` (E, 2I, H),
``mlp.experts.down_proj`` (E, H, I)), so LoRA on ``nn.Linear`` never reaches an expert. This method targets such a
parameter by its path and gives expert e its own LoRA update, eq. (3) of Hu et al. (2021) per slice:

    W'[e] = W[e] + s B[e] A[e],   A: (E, r, d_in),  B: (E, d_out, r) = 0 at init,  s = alpha / r (rsLoRA: / sqrt(r))

The experts forward reads the parameter by name, so the update is applied to the parameter for the length of the
module's forward (peftkit.sites.experts); merging adds it for good. HF PEFT's ``target_parameters`` LoRA is the same
update with the factors laid out as ``lora_A`` (E·r, d_in) and ``lora_B`` (d_out, r·E), one wrapper per parameter.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from peftkit_methods.lora import lora_scaling
from pydantic import Field
from torch import nn

from peftkit import Adapter, Capabilities, Method, MethodConfig, ParameterGroup
from peftkit.sites import ExpertsSite, widened


class ExpertLoRAConfig(MethodConfig):
    method: Literal["lora-experts"] = "lora-experts"
    r: int = Field(default=8, gt=0, description="rank of each expert's update")
    alpha: float = Field(default=16.0, gt=0, description="the update is scaled by alpha / r (alpha / sqrt(r))")
    rslora: bool = Field(default=False, description="scale by alpha / sqrt(r) (rank-stabilised LoRA)")
    init: Literal["kaiming", "gaussian"] = Field(default="kaiming", description="initialisation of A; B is 0")
    lora_plus_ratio: float | None = Field(default=None, gt=0, description="LoRA+: B's learning rate over A's")


class ExpertLoRAAdapter(Adapter):
    def __init__(self, config: ExpertLoRAConfig, site: ExpertsSite) -> None:
        super().__init__()
        self.site = site
        self.rank = config.r
        self.scaling = lora_scaling(config)
        self.b_lr_scale = config.lora_plus_ratio or 1.0
        factory = {"device": site.device, "dtype": site.dtype}
        self.lora_a = nn.ParameterDict(
            {p.name: nn.Parameter(torch.empty(p.experts, config.r, p.in_features, **factory)) for p in site.parameters}
        )
        self.lora_b = nn.ParameterDict(
            {p.name: nn.Parameter(torch.zeros(p.experts, p.out_features, config.r, **factory)) for p in site.parameters}
        )
        for a in self.lora_a.values():
            if a.is_meta:  # no values to initialise (whoever materialises the model does)
                continue
            rows = a.view(-1, a.shape[-1])  # every expert's A drawn as one (E*r, d_in) matrix: fan-in d_in, as PEFT
            if config.init == "kaiming":
                nn.init.kaiming_uniform_(rows, a=math.sqrt(5))
            else:
                nn.init.normal_(rows, std=1.0 / config.r)

    def parameter_group(self, name: str) -> ParameterGroup:
        return ParameterGroup(lr_scale=self.b_lr_scale) if name.startswith("lora_b.") else ParameterGroup()

    def parameter_delta(self, name: str) -> torch.Tensor:
        """s B[e] A[e] for every expert, (E, d_out, d_in), in the factors' dtype and with their gradients."""
        return torch.bmm(self.lora_b[name], self.lora_a[name]) * self.scaling  # "e o r, e r i -> e o i"

    def delta_weight(self, name: str) -> torch.Tensor:
        return torch.bmm(widened(self.lora_b[name]), widened(self.lora_a[name])).mul_(self.scaling)

    def merge(self) -> None:
        for layout in self.site.parameters:
            self.site.add_to_parameter_(layout.name, self.delta_weight(layout.name))

    def unmerge(self) -> None:
        for layout in self.site.parameters:
            self.site.add_to_parameter_(layout.name, -self.delta_weight(layout.name))


class ExpertLoRA(Method):
    name = "lora-experts"
    config = ExpertLoRAConfig
    capabilities = Capabilities(
        site="parameter",
        module_types=(nn.Module,),  # the site decides: a parameter whose experts layout transformers declares
        mergeable=True,
        identity_at_init=True,
        routable=False,
        compose_rules=frozenset({"sum", "stack"}),  # updates of one parameter add up; no gate or weight on them
    )

    @classmethod
    def parameter_count(cls, config: ExpertLoRAConfig, site: ExpertsSite) -> int:
        return sum(p.experts * config.r * (p.in_features + p.out_features) for p in site.parameters)

    @classmethod
    def create(cls, config: ExpertLoRAConfig, site: ExpertsSite) -> ExpertLoRAAdapter:
        return ExpertLoRAAdapter(config, site)

    # -- HF PEFT: a LORA config with target_parameters --------------------------------------------------------------
    # PEFT wraps each targeted parameter of a module in one ParamWrapper, nested in the order of the module's own
    # parameters: with k of them, the j-th (0-based) has k-1-j ".base_layer" segments in its keys,
    # base_model.model.<module>[.base_layer]*.lora_A.weight (E*r, d_in) and .lora_B.weight (d_out, r*E), where
    # lora_A's rows are grouped by expert, (E, r) and lora_B's columns interleaved, (r, E).
    peft_type = "LORA"
    _SUFFIXES = ("lora_A.weight", "lora_B.weight")

    @classmethod
    def reads_peft(cls, peft_config: dict) -> bool:
        return bool(peft_config.get("target_parameters")) and not peft_config.get("use_dora")

    @staticmethod
    def _peft_prefix(module_path: str, names: list[str], name: str) -> str:
        return module_path + ".base_layer" * (len(names) - 1 - names.index(name))

    @classmethod
    def from_peft(
        cls, peft_config: dict, tensors: dict[str, torch.Tensor], model: nn.Module, adapter_name: str
    ) -> tuple[list[dict], dict[str, torch.Tensor]]:
        from peftkit.errors import CheckpointError
        from peftkit.interop.peft import MODEL_PREFIX, peft_field, peftkit_key, refuse_features
        from peftkit.registry import get_method
        from peftkit.sites.experts import expert_layout
        from peftkit.targeting import base_modules

        targets = peft_config.get("target_parameters")
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise CheckpointError(f"target_parameters must be a list of parameter paths, got {targets!r}")
        refuse_features(peft_config, {"rank_pattern": {}, "alpha_pattern": {}, "lora_dropout": 0.0})
        init = peft_config.get("init_lora_weights", True)
        if init not in (True, False, "gaussian"):  # PiSSA, OLoRA, LoftQ...: the adapter fits a rewritten base only
            raise CheckpointError(
                f"the PEFT checkpoint was made with init_lora_weights={init!r}, which peftkit does not read for "
                "target_parameters; only LoRA's own initialisations (true, false, 'gaussian') are"
            )
        rank = peft_field(peft_config, "r", "count", 8)
        scaling_fields = {
            "r": rank,
            "alpha": float(peft_field(peft_config, "lora_alpha", "number", 8)),
            "rslora": peft_field(peft_config, "use_rslora", "flag", False),
        }
        hosts: dict[str, list[str]] = {}
        modules = base_modules(model)
        for path, module in modules.items():
            for name, parameter in module._parameters.items():
                key = f"{path}.{name}"
                if parameter is not None and any(key == t or key.endswith("." + t) for t in targets):
                    hosts.setdefault(path, []).append(name)
        if not hosts:
            raise CheckpointError(f"target_parameters {targets} name no parameter of this model")
        state: dict[str, torch.Tensor] = {}
        remaining = dict(tensors)
        for path, names in hosts.items():
            module = modules[path]
            for name in names:
                layout = expert_layout(module, name)
                if isinstance(layout, str):
                    raise CheckpointError(f"target parameter {path}.{name}: {layout}")
                prefix = MODEL_PREFIX + cls._peft_prefix(path, names, name)
                a = remaining.pop(f"{prefix}.lora_A.weight", None)
                b = remaining.pop(f"{prefix}.lora_B.weight", None)
                want_a = (layout.experts * rank, layout.in_features)
                want_b = (layout.out_features, rank * layout.experts)
                if a is None or b is None or tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                    raise CheckpointError(
                        f"{path}.{name}: expected {prefix}.lora_A.weight {list(want_a)} and lora_B.weight "
                        f"{list(want_b)} (r={rank}, {layout.experts} experts)"
                    )
                state[peftkit_key(path, adapter_name, f"lora_a.{name}")] = a.reshape(layout.experts, rank, -1)
                state[peftkit_key(path, adapter_name, f"lora_b.{name}")] = (
                    b.reshape(layout.out_features, rank, layout.experts).permute(2, 0, 1).contiguous()
                )
        entries = [
            {"method": cls.name, "target": [f"{p}.{n}" for p, ns in hosts.items() for n in ns], **scaling_fields}
        ]
        if remaining or peft_config.get("target_modules"):  # LoRA on modules beside the experts, in the same file
            modules_config = {k: v for k, v in peft_config.items() if k != "target_parameters"}
            module_entries, module_state = get_method("lora").from_peft(modules_config, remaining, model, adapter_name)
            entries += module_entries
            state.update(module_state)
        return entries, state

    @classmethod
    def to_peft(cls, attached: list, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
        from peftkit.errors import CheckpointError
        from peftkit.interop.peft import MODEL_PREFIX

        for field in ("r", "alpha", "rslora"):
            if len({getattr(a.config, field) for a in attached}) > 1:
                raise CheckpointError(f"a PEFT target_parameters adapter has one {field}; these entries differ in it")
        tensors, targets = {}, []
        for a in attached:
            names = [p.name for p in a.module.site.parameters]
            for layout in a.module.site.parameters:
                name, rank = layout.name, a.config.r
                prefix = MODEL_PREFIX + cls._peft_prefix(a.path, names, name)
                tensors[f"{prefix}.lora_A.weight"] = a.module.lora_a[name].reshape(-1, layout.in_features)
                tensors[f"{prefix}.lora_B.weight"] = (
                    a.module.lora_b[name].permute(1, 2, 0).reshape(layout.out_features, rank * layout.experts)
                )
                targets.append(f"{a.path}.{name}")
        config = attached[0].config
        peft_config = {
            "r": config.r,
            "lora_alpha": config.alpha,
            "use_rslora": config.rslora,
            "target_modules": [],
            "target_parameters": targets,
            "lora_dropout": 0.0,
            "bias": "none",
            "init_lora_weights": True,
        }
        return peft_config, tensors
