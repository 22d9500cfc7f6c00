"""``offload_activations``: what autograd saves for the backward, kept in pinned host memory instead of the GPU's.

``torch.autograd.graph.save_on_cpu`` copies every saved tensor, the frozen weights that linear layers save for their
input gradient included: pinned host memory about the size of the model, and a transfer each way per step, for
tensors that stay on the GPU anyway. These hooks leave the model's own parameters and buffers where they are and
move only the activations.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def offloaded_activations(model: nn.Module) -> torch.autograd.graph.saved_tensors_hooks:
    """A context in which the activations autograd saves go to pinned host memory and come back for the backward;
    the model's parameters and buffers (as they are when this is called) are saved by reference, as usual."""
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    pin = torch.cuda.is_available()

    def pack(tensor: torch.Tensor) -> Any:
        if tensor.device.type == "cpu" or tensor.untyped_storage().data_ptr() in owned:
            return tensor
        held = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=pin)
        held.copy_(tensor)
        return tensor.device, held

    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        device, held = packed
        return held.to(device, non_blocking=pin)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)
