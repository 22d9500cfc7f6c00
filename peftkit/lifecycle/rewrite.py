"""Adapters that rewrite their host's weight when they are attached, and the record that undoes it exactly.

Some initialisations move part of the pretrained weight into the adapter and leave a residual in the host (PiSSA's
principal singular directions, OLoRA's QR factors): the adapter is then an identity at init only together with the
residual. The core keeps the host's original parameters (a CPU copy, so GPU memory does not double), hands them
back bit for bit at detach, and refuses, before anything changes, what could not be undone or would change what
something else computes: any other adapter on a rewritten host, a host trained in full (``trainable``) or whose
weight is shared with another module, a weight with no values.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from peftkit.errors import AttachError
from peftkit.lifecycle.state import AttachedAdapter, ModelState
from peftkit.method import Adapter
from peftkit.sites.tied import shared_parameters


def rewrites_base(item: Any) -> bool:
    """Whether a planned item or an attached adapter rewrites its host (its configuration's capabilities say so)."""
    return item.method.capabilities_for(item.config).rewrites_base


def refuse_rewrites(
    model: nn.Module, state: ModelState | None, planned: list[Any], trainable: Iterable[str] = ()
) -> None:
    """Refuse, before the model is touched, a rewriting adapter whose change could not be undone exactly, or that
    would change what another part of the spec computes: a host with a rewritten weight holds that adapter alone
    (another adapter there reads the weight, DoRA its norm, a merge writes into it) and is not trained in full."""
    everything = [*(state.attached if state is not None else []), *planned]
    rewritten: dict[str, str] = {}  # host path -> the first adapter that rewrites it (attached before planned)
    for item in everything:
        if rewrites_base(item):
            rewritten.setdefault(_path(item), _name(item))
    if not rewritten:
        return
    for item in everything:
        path, name = _path(item), _name(item)
        if path in rewritten and name != rewritten[path]:
            merged = isinstance(item, AttachedAdapter) and item.module.merged
            raise AttachError(
                f"adapter {rewritten[path]!r} rewrites the weight of {path!r} at attach (a residual in place of W0), "
                f"and adapter {name!r} ({item.method.name}) is on that module too"
                f"{' and merged into it' if merged else ''}: it would see the residual instead of the weight it "
                "was made for. Put them on different modules, or use an initialisation that leaves the weight alone"
            )
    for path in trainable:
        hit = sorted(p for p in rewritten if p == path or p.startswith(path + "."))
        if hit:
            raise AttachError(
                f"trainable {path!r} trains {hit[0]!r} in full, whose weight adapter {rewritten[hit[0]]!r} rewrites "
                "at attach: the saved weight would be the residual, and detach would drop its training. Leave it "
                "out of trainable or out of the target"
            )
    for item in planned:
        if not rewrites_base(item):
            continue
        path, name = item.row.path, item.row.adapter
        where = f"{item.method.name!r} (adapter {name!r}) at {path!r} rewrites its host's weight at attach"
        shared = shared_parameters(model, path)
        if shared:
            other = next(iter(shared.values()))[0]
            raise AttachError(
                f"{where}, but its {', '.join(shared)} is the same tensor as {other!r}'s (tied weights), which "
                "would change too; leave the tied module out of the target"
            )
        if any(p.is_meta for p in item.module._parameters.values() if p is not None):
            raise AttachError(
                f"{where} from the weight's values, and the host is on the meta device; load or materialise the "
                "model's weights first"
            )


def _path(item: Any) -> str:
    return item.path if isinstance(item, AttachedAdapter) else item.row.path


def _name(item: Any) -> str:
    return item.adapter_name if isinstance(item, AttachedAdapter) else item.row.adapter


def rewrite(
    state: ModelState, path: str, adapter_name: str, host: nn.Module, adapter: Adapter, undo: list[Callable[[], None]]
) -> None:
    """Keep the host's original parameters, then let the adapter write the residual; ``undo`` puts them back."""
    originals = {name: p.detach().to("cpu", copy=True) for name, p in host._parameters.items() if p is not None}
    state.originals[path] = (adapter_name, originals)
    undo.append(functools.partial(restore, state, path, host))
    adapter.rewrite_base()


def restore(state: ModelState, path: str, host: nn.Module) -> None:
    """Put the host's original parameters back, bit for bit, in the tensors the model already holds."""
    _, originals = state.originals.pop(path)
    with torch.no_grad():
        for name, value in originals.items():
            host._parameters[name].copy_(value)


def rewritten_by(state: ModelState, attached: AttachedAdapter) -> bool:
    return state.originals.get(attached.path, (None,))[0] == attached.adapter_name
