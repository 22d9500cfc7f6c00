"""What a refused attach or load must leave exactly as it was: values, flags, hooks, children and peftkit's state."""

from __future__ import annotations

import torch
from torch import nn

from peftkit.lifecycle.attach import get_state


def snapshot(model: nn.Module) -> dict:
    state = get_state(model)
    return {
        "values": {k: v.clone() for k, v in model.state_dict().items()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()},
        "children": {n: sorted(m._modules) for n, m in model.named_modules()},
        "classes": {n: type(m) for n, m in model.named_modules()},  # a host's class swapped by attach (host_forward)
        "state": None
        if state is None
        else (sorted(state.active), sorted(state.spec.adapters), len(state.attached), len(state.hooks)),
    }


def assert_same(before: dict, after: dict) -> None:
    assert after["values"].keys() == before["values"].keys()
    assert all(torch.equal(before["values"][k], v) for k, v in after["values"].items())
    for key in ("flags", "hooks", "children", "classes", "state"):
        assert after[key] == before[key], key
