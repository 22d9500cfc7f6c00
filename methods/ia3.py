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
from pydantic import Field, field_validator
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit import ALL_RULES, Adapter, Capabilities, Method, MethodConfig
from peftkit.patterns import check_patterns, compile_pattern
from peftkit.sites import WeightSite


class IA3Config(MethodConfig):
    method: Literal["ia3"] = "ia3"
    target: str | list[str] = Field(default_factory=lambda: ["@key", "@value", "@ffn_output"])
    # optional: on a model without a findable feed-forward output, explicit targets are all scaled on the output
    feedforward: list[str] = Field(
        default_factory=lambda: ["optional:@ffn_output"], description="targets whose input (not output) is scaled"
    )

    @field_validator("feedforward")
    @classmethod
    def _feedforward_patterns_compile(cls, value: list[str]) -> list[str]:
        return check_patterns(value)


def _scales_input(config: IA3Config, site: WeightSite) -> bool:
    context = site.context
    return any(compile_pattern(pattern, context.places)(context.path) for pattern in config.feedforward)


class IA3Adapter(Adapter):
    def __init__(self, config: IA3Config, site: WeightSite) -> None:
        super().__init__()
        self.site = site
        self.transforms_input = _scales_input(config, site)
        size = site.in_features if self.transforms_input else site.out_features
        self.ia3_scale = nn.Parameter(torch.ones(size, device=site.device, dtype=site.dtype))

    @property
    def side(self) -> str:
        """Which features the scale multiplies: the host's input (a feed-forward output projection) or its output."""
        return "in" if self.transforms_input else "out"

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.ia3_scale

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out if self.transforms_input else out * self.ia3_scale

    def merge_refusal(self) -> str | None:
        if not torch.isfinite(self.ia3_scale.detach()).all():
            return "its scale holds a NaN or infinite entry, which would poison the merged weights; run it unmerged"
        return None

    def merge(self) -> None:
        # Unmerging by dividing would drift (~1e-2 per cycle in bf16) and turn a zero scale into NaN, so the host's
        # original weight and bias are kept while merged and put back exactly: one copy of this host's weights.
        module = self.site.module
        self.__dict__["_unmerged"] = {
            name: tensor.detach().clone()
            for name in ("weight", "bias")
            if isinstance(tensor := getattr(module, name, None), torch.Tensor)
        }
        self.site.scale_features_(self.ia3_scale, self.side)

    def unmerge(self) -> None:
        kept = self.__dict__.pop("_unmerged", None)
        if kept is None:  # merged by a copy of this adapter that did not keep the weights: divide instead
            self.site.scale_features_(1.0 / self.ia3_scale.detach(), self.side)
            return
        with torch.no_grad():
            for name, original in kept.items():
                getattr(self.site.module, name).copy_(original)


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

    # -- HF PEFT checkpoints (peftkit.from_peft / peftkit.to_peft) ------------------------------------------------
    # PEFT key base_model.model.<path>.ia3_l: (d_out, 1) scales the host's output, (1, d_in) scales its input (a
    # feedforward module). peftkit's ia3_scale is the same vector, flat; which side it scales is read from the shape
    # (and written back the same way), so the spec lists every path as a target and the input-scaled ones as
    # feedforward.
    peft_type = "IA3"

    @classmethod
    def from_peft(
        cls, peft_config: dict, tensors: dict[str, torch.Tensor], model: nn.Module, adapter_name: str
    ) -> tuple[list[dict], dict[str, torch.Tensor]]:
        from peftkit.errors import CheckpointError
        from peftkit.interop.peft import peftkit_key, split_peft_key

        targets, feedforward, state = [], [], {}
        for key, tensor in tensors.items():
            path, _ = split_peft_key(key, ("ia3_l",))
            if tensor.dim() != 2 or 1 not in tensor.shape:
                raise CheckpointError(f"IA3 vector {key!r} has shape {list(tensor.shape)}; expected (d, 1) or (1, d)")
            targets.append(path)
            if tensor.shape[0] == 1 and tensor.shape[1] != 1:
                feedforward.append(path)
            state[peftkit_key(path, adapter_name, "ia3_scale")] = tensor.reshape(-1)
        if not targets:
            raise CheckpointError("the PEFT IA3 checkpoint holds no ia3_l tensors")
        return [{"method": "ia3", "target": targets, "feedforward": feedforward}], state

    @classmethod
    def to_peft(cls, attached: list, model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
        from peftkit.errors import CheckpointError
        from peftkit.interop.peft import peft_key

        conv1d = [isinstance(a.module.site.module, Conv1D) for a in attached]
        if any(conv1d) and not all(conv1d):
            raise CheckpointError("PEFT's fan_in_fan_out is one flag: it cannot mix GPT-2 Conv1D and other hosts")
        tensors = {
            peft_key(a.path, "ia3_l"): a.module.ia3_scale.reshape((1, -1) if a.module.transforms_input else (-1, 1))
            for a in attached
        }
        config = {
            "target_modules": sorted(a.path for a in attached),
            "feedforward_modules": sorted(a.path for a in attached if a.module.transforms_input),
            "fan_in_fan_out": all(conv1d),
            "init_ia3_weights": True,
        }
        return config, tensors
