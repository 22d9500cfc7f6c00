"""Which modules hold the same tensor: a tied LM head and input embedding, found from the parameters themselves
(whatever a model calls them, and whatever its tied-weight metadata says), so that merging into one holder is
refused or followed into all of them."""

from __future__ import annotations

from torch import nn


def shared_parameters(model: nn.Module, path: str) -> dict[str, list[str]]:
    """The host's own parameters (by name) that other modules of the model hold too, with those modules' paths."""
    modules = dict(model.named_modules(remove_duplicate=False))
    host = modules[path]
    owners: dict[int, list[str]] = {}
    for other_path, module in modules.items():
        if module is host:
            continue
        for name, parameter in module._parameters.items():
            if parameter is not None:
                owners.setdefault(id(parameter), []).append(f"{other_path}.{name}" if other_path else name)
    return {
        name: owners[id(parameter)]
        for name, parameter in host._parameters.items()
        if parameter is not None and id(parameter) in owners
    }


def tied_holders(model: nn.Module, path: str) -> dict[str, nn.Module]:
    """The other modules (by path) that hold one of the host's parameters."""
    modules = dict(model.named_modules(remove_duplicate=False))
    paths = {held.rpartition(".")[0] for owners in shared_parameters(model, path).values() for held in owners}
    return {p: modules[p] for p in sorted(paths) if modules[p] is not modules[path]}
