"""Composition rules: how several adapters at one host combine.

Without a rule, a host runs its active adapters one after another in the order they were attached; for additive
methods (LoRA, parallel adapters) that is their sum, for output transforms (bottleneck adapters) it is a stack. A
spec's ``compose`` list makes the combination explicit for a set of its adapters:

- ``sum``: every adapter sees the host's output without the others and their changes add up;
- ``stack``: applied in the rule's order, each seeing the previous one's output;
- ``gate``: like ``sum``, each change scaled by a learned scalar per host (UniPELT, Mao et al. 2022), starting
  at ``gate_init``;
- ``average``: like ``sum`` with fixed weights that sum to 1, so the average of identical adapters is one of them;
- ``fuse``: AdapterFusion (Pfeiffer et al. 2021): a learned attention at each host over its members' outputs, with
  the host's own output as the query; the members are frozen and only the fusion trains. Its value map starts as the
  identity, so fusing one adapter computes that adapter.

A method lists the rules it supports in ``Capabilities.compose_rules``; a rule a member cannot take part in is
refused when the spec is attached, naming the method, the host and the rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from peftkit.errors import AttachError

Rule = Literal["sum", "stack", "gate", "average", "fuse"]


class Composition(BaseModel):
    """One rule over a set of the spec's adapters, at every host where they meet (or at ``target`` hosts)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    rule: Rule
    adapters: list[str] = Field(min_length=1, description="adapter names of this spec, in the order of the rule")
    weights: list[float] | None = Field(default=None, description="average: one weight per adapter, summing to 1")
    gate_init: float = Field(default=1.0, description="gate: the gates' initial value")

    @field_validator("adapters")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"adapters {value} name one adapter twice")
        return value

    @model_validator(mode="after")
    def _weights_fit_the_rule(self) -> Composition:
        if self.rule != "fuse" and len(self.adapters) < 2:
            raise ValueError(f"a {self.rule!r} rule combines at least two adapters; {self.adapters} is one")
        if self.rule == "average":
            if self.weights is None or len(self.weights) != len(self.adapters):
                raise ValueError("average needs weights, one per adapter")
            if abs(sum(self.weights) - 1.0) > 1e-6:
                raise ValueError(f"average weights must sum to 1, got {sum(self.weights):g}")
        elif self.weights is not None:
            raise ValueError(f"weights are for the average rule, not {self.rule!r}")
        return self


# Rules that weight their members (learned gates, fixed averages, an attention): a merged weight cannot hold them.
WEIGHTING_RULES: frozenset[str] = frozenset({"gate", "average", "fuse"})
# Rules with trained numbers of their own at each host (kept in the host's container under ``gate_name``).
LEARNED_RULES: frozenset[str] = frozenset({"gate", "fuse"})


def weighted_adapters(compositions: list[Composition]) -> set[str]:
    """The adapters a weighting rule scales, which therefore cannot be merged into the base weights."""
    return {name for c in compositions if c.rule in WEIGHTING_RULES for name in c.adapters}


def gate_name(index: int) -> str:
    """The container key of rule ``index``'s gates: it starts with a digit, which no adapter name can."""
    return f"{index}_gate"


class Gates(nn.Module):
    """A learned scalar per member adapter at one host."""

    def __init__(self, count: int, init: float, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.gates = nn.Parameter(torch.full((count,), init, device=device, dtype=dtype))


class Fusion(nn.Module):
    """AdapterFusion at one host: query from the host's output, keys and values from each member's output, one
    softmax over the members per position. The value map starts as the identity and the query and key maps near
    zero (as AdapterHub's), so the fusion starts as the members' average, and as the member itself when it has one."""

    def __init__(self, features: int, device: torch.device, dtype: torch.dtype, feature_axis: int = -1) -> None:
        super().__init__()
        self.feature_axis = feature_axis  # 1 for a convolution's (batch, channels, height, width)
        like = {"device": device, "dtype": dtype}
        self.query, self.key = nn.Linear(features, features, **like), nn.Linear(features, features, **like)
        self.value = nn.Linear(features, features, **like)
        if device.type != "meta":
            with torch.no_grad():
                for layer in (self.query, self.key):
                    layer.weight.normal_(std=0.02)
                    layer.bias.zero_()
                self.value.weight.copy_(torch.eye(features, **like))
                self.value.bias.zero_()

    def forward(self, host_output: torch.Tensor, member_outputs: list[torch.Tensor]) -> torch.Tensor:
        axis = self.feature_axis
        outputs = torch.stack([o.movedim(axis, -1) for o in member_outputs])  # "n ... d"
        scores = (self.query(host_output.movedim(axis, -1)).unsqueeze(0) * self.key(outputs)).sum(-1)  # "n ..."
        weights = scores.softmax(dim=0).unsqueeze(-1)
        return (weights * self.value(outputs)).sum(0).movedim(-1, axis)


def rule_module(
    composition: Composition, features: int | None, device: torch.device, dtype: torch.dtype, feature_axis: int = -1
) -> nn.Module:
    """The trained numbers of a learned rule at one host with ``features`` output features (None: unknown) along
    ``feature_axis`` of its output."""
    if composition.rule == "gate":
        return Gates(len(composition.adapters), composition.gate_init, device, dtype)
    if features is None:
        raise AttachError(f"cannot fuse {composition.adapters}: their adapters do not say the host's output width")
    return Fusion(features, device, dtype, feature_axis)


def check_rules(compositions: list[Composition], attached: list[Any]) -> None:
    """Refuse, before anything changes, a rule that a member's method does not support at one of its hosts."""
    for composition in compositions:
        for item in attached:
            if item.adapter_name in composition.adapters:
                rules = item.method.capabilities_for(item.config).compose_rules
                if composition.rule not in rules:
                    raise AttachError(
                        f"{item.method.name!r} (adapter {item.adapter_name!r}) at {item.path!r} cannot be composed "
                        f"by {composition.rule!r}; it supports {sorted(rules) or 'no composition rules'}"
                    )


def compose_output(
    container: Mapping[str, nn.Module],
    compositions: list[Composition],
    active: set[str],
    x: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """The host's output with its active adapters combined by the spec's rules (the hook calls this)."""
    rule_of = {name: i for i, c in enumerate(compositions) for name in c.adapters}
    done: set[int] = set()
    for name, adapter in container.items():
        if name not in active or getattr(adapter, "merged", True):
            continue
        index = rule_of.get(name)
        if index is None:
            out = adapter(x, out)
        elif index not in done:
            done.add(index)
            out = _apply_rule(compositions[index], container, gate_name(index), active, x, out)
    return out


def _apply_rule(
    composition: Composition,
    container: Mapping[str, nn.Module],
    gates_key: str,
    active: set[str],
    x: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    members = [(i, container[n]) for i, n in enumerate(composition.adapters) if n in container and n in active]
    members = [(i, a) for i, a in members if not a.merged]
    if composition.rule == "fuse":
        if not members:
            return out
        fused = container[gates_key](out, [adapter(x, out.clone()) for _, adapter in members])
        return fused.to(out.dtype)
    if composition.rule == "stack":
        for _, adapter in members:
            out = adapter(x, out)
        return out
    if composition.rule == "gate":
        weights = container[gates_key].gates
    elif composition.rule == "average":
        weights = torch.tensor(composition.weights, dtype=out.dtype, device=out.device)
    else:
        weights = None
    total = out
    for i, adapter in members:  # each sees the host's output without the others (a copy: some add in place)
        change = adapter(x, out.clone()) - out
        total = total + (change if weights is None else weights[i].to(out.dtype) * change)
    return total
