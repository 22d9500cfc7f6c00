"""LayerNorm tuning (Zhao et al. 2024, arXiv:2312.11420; HF PEFT's LN_TUNING): train only the scale and shift of the
model's normalisation layers.

Each targeted vector ``v`` (a norm's ``weight`` and ``bias``) gets a trainable delta δ, zero at init; the norm
computes with ``v + δ`` through its own forward, so every family's norm is followed as it is written (LayerNorm,
Llama's and Qwen's RMSNorm, Gemma's ``1 + weight``); merging adds δ to ``v``. The target selects parameter paths
among the model's norm layers: ``*`` (the default) is every scale and shift of every norm, ``*.weight`` the scales
only, ``*layers.0.*`` one block's. A norm layer is an ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm`` or batch norm,
or a module whose class name ends in ``Norm`` (transformers' per-family RMSNorm classes share no base class).

HF PEFT's LN_TUNING checkpoints hold trained copies of whole norm layers (``<path>.ln_tuning_layers.<name>``): they
load as the delta from this model's values, and export as this model's values plus the delta.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from peftkit_methods.vector_delta import VectorDeltaAdapter, vector_count
from pydantic import Field
from torch import nn

from peftkit import Capabilities, Method, MethodConfig
from peftkit.sites import VectorsSite

_NORM_TYPES = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)


class _IsNormLayer(type):
    def __instancecheck__(cls, module: Any) -> bool:
        return isinstance(module, _NORM_TYPES) or (
            isinstance(module, nn.Module) and type(module).__name__.endswith("Norm")
        )


class NormLayer(metaclass=_IsNormLayer):
    """``isinstance(module, NormLayer)``: a normalisation layer of torch or of any transformers family."""


class LNTuningConfig(MethodConfig):
    method: Literal["ln-tuning"] = "ln-tuning"
    target: str | list[str] = Field(default="*", description="norm parameter paths (a glob or 're:' regex)")


class LNTuning(Method):
    name = "ln-tuning"
    config = LNTuningConfig
    capabilities = Capabilities(
        site="vector",
        module_types=(NormLayer,),  # type: ignore[arg-type]
        mergeable=True,
        identity_at_init=True,
        compose_rules=frozenset({"sum", "stack"}),
    )

    @classmethod
    def parameter_count(cls, config: LNTuningConfig, site: VectorsSite) -> int:
        return vector_count(site)

    @classmethod
    def create(cls, config: LNTuningConfig, site: VectorsSite) -> VectorDeltaAdapter:
        return VectorDeltaAdapter(site)

    # -- HF PEFT checkpoints (peftkit.from_peft / peftkit.to_peft) ------------------------------------------------
    peft_type = "LN_TUNING"
    _PEFT_UNSUPPORTED = {"layers_to_transform": None, "modules_to_save": None}

    @classmethod
    def from_peft(
        cls, peft_config: dict, tensors: dict[str, torch.Tensor], model: nn.Module, adapter_name: str
    ) -> tuple[list[dict], dict[str, torch.Tensor]]:
        from peftkit.errors import CheckpointError
        from peftkit.interop.peft import MODEL_PREFIX, peftkit_key, refuse_features

        refuse_features(peft_config, cls._PEFT_UNSUPPORTED)
        modules = dict(model.named_modules())
        state: dict[str, torch.Tensor] = {}
        targets: list[str] = []
        for key, tensor in tensors.items():
            path, marker, name = key.removeprefix(MODEL_PREFIX).rpartition(".ln_tuning_layers.")
            if not key.startswith(MODEL_PREFIX) or not marker or "." in name:
                raise CheckpointError(f"unexpected tensor {key!r} in the PEFT LN_TUNING checkpoint")
            own = modules[path]._parameters.get(name) if path in modules else None
            if own is None or tuple(own.shape) != tuple(tensor.shape):
                shape = None if own is None else list(own.shape)
                raise CheckpointError(f"LN_TUNING's {path}.{name} {list(tensor.shape)} has no match here ({shape})")
            state[peftkit_key(path, adapter_name, f"deltas.{name}")] = tensor.to(own.dtype) - own.detach()
            targets.append(f"{path}.{name}")
        if not targets:
            raise CheckpointError("the PEFT LN_TUNING checkpoint holds no tensors")
        return [{"method": cls.name, "target": sorted(targets)}], state

    @classmethod
    def to_peft(cls, attached: list, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
        from peftkit.interop.peft import MODEL_PREFIX

        tensors: dict[str, torch.Tensor] = {}
        for a in attached:
            host = a.module.site.module
            for name, own in host._parameters.items():  # PEFT trains a copy of the whole norm: all its vectors
                if own is not None:
                    delta = a.module.deltas.get(name, 0.0)
                    tensors[f"{MODEL_PREFIX}{a.path}.ln_tuning_layers.{name}"] = own.detach() + delta
        return {"target_modules": sorted(a.path for a in attached)}, tensors
