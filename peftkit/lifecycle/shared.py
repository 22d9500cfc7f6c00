"""State shared by all the adapters of one spec entry (``Method.shared_state``), kept once on the model.

The tensors live in a :class:`SharedTensors` module registered under the entry's first adapter, as its child
``peftkit_shared``: they move with ``model.to()``, appear in the state dict once (under that adapter's keys, so
``peftkit.save`` writes them with the adapter and ``detach`` removes them with it), and every adapter of the entry
reaches them through its site (``site.shared``) without registering them a second time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from peftkit.errors import AttachError
from peftkit.keys import SHARED_CHILD
from peftkit.method import Adapter, SharedState


class SharedTensors(nn.Module):
    """The shared tensors of one entry, by name, as buffers (persistent when saved)."""

    def __init__(self, state: SharedState, device: torch.device) -> None:
        super().__init__()
        for name, tensor in state.tensors.items():
            if not name.isidentifier():
                raise AttachError(f"shared tensor name {name!r} is not an identifier; name it like an attribute")
            if isinstance(tensor, nn.Parameter) or not isinstance(tensor, torch.Tensor):
                raise AttachError(
                    f"shared state {name!r} is a {type(tensor).__name__}: shared state is frozen tensors; a trained "
                    "parameter belongs to an adapter (one per host), where the plan counts it"
                )
            self.register_buffer(name, tensor.detach().to(device), persistent=state.saved)


def build_shared_state(planned: Sequence[Any]) -> dict[tuple[str, int], SharedTensors]:
    """For each (adapter, entry) of the plan whose method shares state: its tensors, built from every site the entry
    selects; each of those sites gets ``shared`` (None for the others). Nothing is attached to the model yet."""
    groups: dict[tuple[str, int], list[Any]] = {}
    for item in planned:
        groups.setdefault((item.row.adapter, item.row.entry), []).append(item)
    built: dict[tuple[str, int], SharedTensors] = {}
    for key, items in groups.items():
        first = items[0]
        state = first.method.shared_state(first.config, [item.site for item in items])
        if state is not None:
            built[key] = SharedTensors(state, _device_of(first.site))
        for item in items:
            item.site.shared = built.get(key)
    return built


def adopt_shared_state(built: Sequence[tuple[Any, Adapter]], shared: dict[tuple[str, int], SharedTensors]) -> None:
    """Register each entry's shared tensors under the entry's first built adapter (before it is installed)."""
    for item, adapter in built:
        module = shared.pop((item.row.adapter, item.row.entry), None)
        if module is not None:
            if hasattr(adapter, SHARED_CHILD):
                raise AttachError(f"{type(adapter).__name__} has its own {SHARED_CHILD!r}; the name is the core's")
            adapter.add_module(SHARED_CHILD, module)


def _device_of(site: Any) -> torch.device:
    device = getattr(site, "device", None)
    return device if isinstance(device, torch.device) else torch.device("cpu")
