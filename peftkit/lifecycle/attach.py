"""Attach, detach, merge and unmerge adapters, and keep the training state honest.

Adapters live in an ``nn.ModuleDict`` named ``peftkit_adapters`` on their host module, so they move with
``model.to()``, appear in ``model.parameters()`` and in the state dict under new keys, while every key and value the
base model had stays exactly as it was. One forward hook per host runs the host's active adapters on its output.
Attaching is all or nothing: every adapter is built before the model is touched, and a failure while installing
rolls back what was installed, so a failed attach leaves the model as it was.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.compose import LEARNED_RULES, check_rules, gate_name, rule_module
from peftkit.errors import AttachError
from peftkit.keys import ADAPTER_CONTAINER
from peftkit.lifecycle.activation import routed_input
from peftkit.lifecycle.dequantize import dequantized_hosts, install_dequantized
from peftkit.lifecycle.host_forward import SwappedClass, can_swap_class, run_adapters
from peftkit.lifecycle.merging import merge, mergeable_choice, unmerge
from peftkit.lifecycle.rewrite import refuse_rewrites, restore, rewrite, rewrites_base, rewritten_by
from peftkit.lifecycle.shared import adopt_shared_state, build_shared_state
from peftkit.lifecycle.state import (
    STATE_ATTRIBUTE,
    AttachedAdapter,
    ModelState,
    Removable,
    get_state,
    require_state,
)
from peftkit.lifecycle.tied import follow, holders_to_follow
from peftkit.method import Adapter, Method
from peftkit.patterns import compile_pattern
from peftkit.sites.placements import places_of
from peftkit.spec import Spec
from peftkit.targeting import Plan, base_modules, resolve


# Hooks are partials of module-level functions, never closures: copy.deepcopy(model) deep-copies a partial's
# arguments with the model (the copy's hooks then drive the copy's state and adapters), but shares a closure's.
def _make_hook(state: ModelState):
    return functools.partial(run_adapters, state)


def _make_input_hook(state: ModelState, name: str, adapter: Adapter):
    return functools.partial(_transform_input, state, name, adapter)


def _transform_input(
    state: ModelState, name: str, adapter: Adapter, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    if (name not in state.active and state.routing is None) or adapter.merged:
        return None
    if state.routing is not None:
        change = functools.partial(routed_input, adapter, name, state.routing)
    else:
        change = adapter.transform_input
    if args:
        return (change(args[0]), *args[1:]), kwargs
    key = "hidden_states" if "hidden_states" in kwargs else next(k for k, v in kwargs.items() if torch.is_tensor(v))
    return args, {**kwargs, key: change(kwargs[key])}


def plan(model: nn.Module, spec: Spec | Mapping[str, Any] | str | Path) -> Plan:
    """Dry run: which module gets which adapter, with parameter counts. Nothing is changed."""
    return resolve(model, Spec.coerce(spec))[0]


def _set_training_state(model: nn.Module, state: ModelState) -> None:
    """Freeze the base, then make trainable exactly the adapters and the spec's ``trainable`` modules."""
    modules = dict(model.named_modules())
    for name, parameter in model.named_parameters():
        if ADAPTER_CONTAINER not in name.split("."):
            state.original_requires_grad.setdefault(name, parameter.requires_grad)
            parameter.requires_grad_(False)
    _train_adapters(state)
    for path in plan_trainable_paths(model, state.spec):
        for parameter in modules[path].parameters():
            parameter.requires_grad_(True)


def _train_adapters(state: ModelState) -> None:
    """Make every attached adapter trainable, except the members of a ``fuse`` rule: only the fusion trains."""
    fused = {name for c in state.spec.compose if c.rule == "fuse" for name in c.adapters}
    for attached in state.attached:
        for parameter in attached.module.parameters():
            parameter.requires_grad_(attached.adapter_name not in fused)


def plan_trainable_paths(model: nn.Module, spec: Spec) -> list[str]:
    paths = []
    for pattern in spec.trainable:
        match = compile_pattern(pattern, places_of(model))
        paths.extend(p for p in base_modules(model) if match(p) and p not in paths)
    return paths


def attach(model: nn.Module, spec: Spec | Mapping[str, Any] | str | Path, *, activate: bool = True) -> nn.Module:
    """Attach the spec's adapters to ``model`` in place and return the same model object.

    The base is frozen and only the adapters (and the spec's ``trainable`` modules) train. A model that already has
    adapters gets these as well; names must differ. The new adapters are **activated** by default, next to the
    ones already active, so the model then runs all of them (summed where they meet, unless a ``compose`` rule
    says otherwise); ``activate=False`` attaches them inactive (HF PEFT's ``add_adapter``), for
    :func:`peftkit.activate` or :func:`peftkit.route` to choose later. If anything fails the model is left exactly
    as it was.
    """
    spec = Spec.coerce(spec)
    previous = get_state(model)
    combined = previous.spec.merged_with(spec) if previous is not None else spec
    _, planned = resolve(model, spec)
    check_rules(
        combined.compose,
        [
            *(previous.attached if previous else []),
            *(_Planned(i.row.adapter, i.row.path, i.method, i.config) for i in planned),
        ],
    )
    _refuse_oversized(model, planned)
    refuse_rewrites(model, previous, planned, plan_trainable_paths(model, combined))
    # A new module is in training mode; an adapter follows its host instead, so that attaching to a model in eval
    # mode does not switch on the adapter's dropout.
    shared = build_shared_state(planned)
    built = [(item, item.method.create(item.config, item.site).train(item.module.training)) for item in planned]
    adopt_shared_state(built, shared)
    _refuse_adapters_holding_the_base(model, built)
    following = holders_to_follow(model, built)
    composed = {n: c.rule for c in combined.compose if c.rule != "stack" for n in c.adapters}
    for item, adapter in built:
        if adapter.transforms_input and item.row.adapter in composed:
            raise AttachError(
                f"{item.method.name!r} (adapter {item.row.adapter!r}) at {item.row.path!r} changes its host's input, "
                f"which only the 'stack' rule composes, not {composed[item.row.adapter]!r}"
            )

    state = previous or ModelState(spec=combined)
    saved_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    # Every change is logged with its inverse as it is made, so a failure at any step (a hostile adapter name, a
    # site's install, a gate) unwinds exactly what was done so far, in reverse order.
    undo: list[Callable[[], None]] = []
    try:
        if previous is None:
            object.__setattr__(model, STATE_ATTRIBUTE, state)
            undo.append(functools.partial(_drop_state, model))
        undo.append(functools.partial(_restore_fields, state, state.spec, set(state.active), state.untied))
        undo.append(functools.partial(_restore_dict, state.original_requires_grad, dict(state.original_requires_grad)))
        state.spec = combined
        for item, adapter in built:
            _install(state, item, adapter, undo, following.get(id(adapter), {}))
        _add_gates(model, state, len(combined.compose) - len(spec.compose), undo)
        if activate:
            state.active.update(spec.adapters)
        _set_training_state(model, state)
    except BaseException:
        for step in reversed(undo):
            step()
        for name, parameter in model.named_parameters():
            if name in saved_flags:
                parameter.requires_grad_(saved_flags[name])
        raise
    return model


def _install(
    state: ModelState, item: Any, adapter: Adapter, undo: list[Callable[[], None]], holders: dict[str, nn.Module]
) -> None:
    """Put one built adapter on its host: container, forward hook, the site's own hooks, hooks at the holders of a
    tied weight it follows; each step logs its undo."""
    host, path, name = item.module, item.row.path, item.row.adapter
    container = getattr(host, ADAPTER_CONTAINER, None)
    if container is None:
        container = nn.ModuleDict().train(host.training)
        container.__dict__["_peftkit_state"] = state  # for hooks that find adapters through their host
        host.add_module(ADAPTER_CONTAINER, container)
        undo.append(functools.partial(delattr, host, ADAPTER_CONTAINER))
        if can_swap_class(item.site, host):  # its forward runs its adapters, fused where they can (host_forward.py)
            handle = SwappedClass(host)
        else:
            handle = host.register_forward_hook(_make_hook(state), with_kwargs=True)
        state.hooks[path] = handle
        undo.append(functools.partial(_drop_hook, state, path, handle))
    container[name] = adapter
    undo.append(functools.partial(container.__delitem__, name))
    adapter.__dict__["peftkit_method"] = item.method  # routing groups a host's adapters by method
    if rewrites_base(item):
        adapter.__dict__["peftkit_rewrites_base"] = True
        rewrite(state, path, name, host, adapter, undo)
    extra = list(item.site.install(adapter)) if hasattr(item.site, "install") else []
    extra.extend(follow(state, name, adapter, holders))
    undo.extend(handle.remove for handle in extra)
    if adapter.transforms_input:
        hook = _make_input_hook(state, name, adapter)
        extra.append(host.register_forward_pre_hook(hook, with_kwargs=True))
        undo.append(extra[-1].remove)
    attached = AttachedAdapter(name, path, item.method, item.config, adapter, item.row.entry, extra)
    state.attached.append(attached)
    undo.append(functools.partial(state.attached.remove, attached))


def _drop_hook(state: ModelState, path: str, handle: Removable) -> None:
    handle.remove()
    state.hooks.pop(path, None)


def _restore_fields(state: ModelState, spec: Spec, active: set[str], untied: dict) -> None:
    state.spec, state.active, state.untied = spec, active, untied


def _restore_dict(target: dict, snapshot: dict) -> None:
    target.clear()
    target.update(snapshot)


# An adapter larger than this many times its model is a typo (r, length or bottleneck off by orders of magnitude),
# not parameter-efficient fine-tuning; below the floor, nothing is refused (tiny test models, wide adapters).
MAX_ADAPTER_TO_MODEL = 4
ADAPTER_SIZE_FLOOR = 1 << 24


def _refuse_oversized(model: nn.Module, planned: list[Any]) -> None:
    """Refuse, from the plan's parameter counts and before anything is allocated, adapters far larger than the
    model: ``r: 100000000`` in a shared spec must be an error, not a request for gigabytes."""
    total = sum(item.row.parameters for item in planned)
    base = sum(p.numel() for p in model.parameters())
    if total > max(MAX_ADAPTER_TO_MODEL * base, ADAPTER_SIZE_FLOOR):
        largest = max(planned, key=lambda item: item.row.parameters).row
        raise AttachError(
            f"the adapters would hold {total:,} parameters, more than {MAX_ADAPTER_TO_MODEL}x the model's {base:,}; "
            f"the largest is {largest.adapter!r} ({largest.method}) at {largest.path!r} with {largest.parameters:,}. "
            "Check its size fields (r, length, bottleneck, reduction_factor)"
        )


def _refuse_adapters_holding_the_base(model: nn.Module, built: list[tuple[Any, Adapter]]) -> None:
    """An adapter that registers one of the model's own modules or parameters (``self.host = site.module``, an
    easy slip) would make that part of the base trainable, save it with the adapter, and make ``state_dict()``
    recurse through the host's adapter container: refuse it before the model is touched."""
    base = {id(m): "module" for m in model.modules()} | {id(p): "parameter" for p in model.parameters()}
    for item, adapter in built:
        owned = [*adapter.named_modules(remove_duplicate=False), *adapter.named_parameters(remove_duplicate=False)]
        for name, value in owned:
            if name and id(value) in base:
                raise AttachError(
                    f"{item.method.name!r} ({item.method.__module__}) registers a {base[id(value)]} of the model as "
                    f"`{name}` of its adapter at {item.row.path!r}; an adapter may only own new parameters. Keep a "
                    "plain reference instead: `self.site = site` (a site is not a module), or "
                    "`self.__dict__['host'] = site.module`"
                )


def _remove(model: nn.Module, state: ModelState, removing: list[AttachedAdapter]) -> None:
    modules = dict(model.named_modules())
    for attached in removing:
        host = modules[attached.path]
        container = getattr(host, ADAPTER_CONTAINER)
        if rewritten_by(state, attached):
            restore(state, attached.path, host)
        del container[attached.adapter_name]
        for handle in attached.site_hooks:
            handle.remove()
        if all(key[0].isdigit() for key in container):  # only composition gates left
            for key in list(container):
                del container[key]
        if len(container) == 0:
            delattr(host, ADAPTER_CONTAINER)
            state.hooks.pop(attached.path).remove()
        state.attached.remove(attached)


def _drop_state(model: nn.Module) -> None:
    if STATE_ATTRIBUTE in model.__dict__:
        object.__delattr__(model, STATE_ATTRIBUTE)


def detach(model: nn.Module, names: str | Iterable[str] | None = None) -> nn.Module:
    """Remove adapters (all, or the named ones); merged ones are unmerged first.

    Detaching every adapter of an unmerged model restores it bit for bit, ``requires_grad`` flags included.
    """
    state = require_state(model)
    removing = state.adapters(names)
    merged = [a for a in removing if a.module.merged]
    if merged:
        unmerge(model, sorted({a.adapter_name for a in merged}))
    _remove(model, state, removing)
    gone = {a.adapter_name for a in removing} - {a.adapter_name for a in state.attached}
    state.active -= gone
    if not state.attached:
        for name, parameter in model.named_parameters():
            if name in state.original_requires_grad:
                parameter.requires_grad_(state.original_requires_grad[name])
        _drop_state(model)
    else:
        # A rule that loses a member goes (its adapters run one after another again); the others keep their gates,
        # renamed to their new rule index.
        kept = [i for i, c in enumerate(state.spec.compose) if not set(c.adapters) & gone]
        _rename_gates(model, {old: new for new, old in enumerate(kept)})
        state.spec = Spec(
            adapters={k: v for k, v in state.spec.adapters.items() if k not in gone},
            trainable=state.spec.trainable,
            compose=[state.spec.compose[i] for i in kept],
        )
    return model


@dataclass(frozen=True)
class _Planned:
    adapter_name: str
    path: str
    method: type[Method]
    config: Any


def _add_gates(model: nn.Module, state: ModelState, offset: int, undo: list[Callable[[], None]]) -> None:
    """Learned gates for the spec's ``gate`` rules (from rule ``offset`` on), at each host one of their members is;
    each added gate logs its removal in ``undo``."""
    modules = dict(model.named_modules())
    for index, composition in enumerate(state.spec.compose[offset:], start=offset):
        if composition.rule not in LEARNED_RULES:
            continue
        for path in dict.fromkeys(a.path for a in state.attached if a.adapter_name in composition.adapters):
            container = getattr(modules[path], ADAPTER_CONTAINER)
            if gate_name(index) not in container:
                member = next(iter(container[n] for n in composition.adapters if n in container))
                parameter = next(member.parameters())
                site = getattr(member, "site", None)
                along = getattr(site, "along_features", None)  # a (d,) vector shaped (d, 1, 1): channels first
                axis = 1 if callable(along) and along(torch.ones(1)).shape != (1,) else -1
                features = getattr(site, "out_features", None)
                learned = rule_module(composition, features, parameter.device, parameter.dtype, axis)
                container[gate_name(index)] = learned.train(container.training)
                undo.append(functools.partial(container.__delitem__, gate_name(index)))


def _rename_gates(model: nn.Module, new_index: dict[int, int]) -> None:
    """Move each kept rule's gates to its new index; drop the gates of rules that are gone."""
    for module in model.modules():
        container = module._modules.get(ADAPTER_CONTAINER)
        if container is None:
            continue
        gates = {key: container[key] for key in container if key[0].isdigit()}
        for key in gates:
            del container[key]
        for key, module_gates in gates.items():
            old = int(key.split("_", 1)[0])
            if old in new_index:
                container[gate_name(new_index[old])] = module_gates


def merge_and_detach(
    model: nn.Module,
    names: str | Iterable[str] | None = None,
    *,
    untie: bool = False,
    dequantize: torch.dtype | None = None,
) -> nn.Module:
    """Bake adapters (the active ones, or the named ones) into the base weights for good and remove them.

    What is left is a plain model with no hooks and no adapter modules, for export or serving (HF PEFT's
    ``merge_and_unload``). Refused up front, like :func:`merge`, if a chosen adapter cannot be merged or its host
    shares a weight with another module; with ``untie=True`` such a host keeps its own merged copy for good, and
    the model's config stops asking transformers to tie the word embeddings again when it is saved and loaded.

    A quantised base refuses a merge into its packed weights; ``dequantize=torch.bfloat16`` (or float32) instead
    replaces every quantised layer by a plain one holding its dequantised weight with the updates merged, and
    casts the model to that dtype: a floating-point model that computes what the adapters did over the quantised
    base, up to the dequantisation's rounding."""
    state = require_state(model)
    if isinstance(names, str):
        names = [names]
    chosen = [a for a in state.adapters(names) if names is not None or a.adapter_name in state.active]
    if dequantize is not None:
        mergeable_choice(state, names)  # a method that cannot merge is refused before any dequantising
    replacements = {} if dequantize is None else dequantized_hosts(model, state, chosen, dequantize)
    premerged = [a for a in chosen if a.path in replacements and not a.module.merged]
    for attached in premerged:
        attached.module.merged = True  # their updates are in the replacements: merge() passes them by
    try:
        merge(model, sorted({a.adapter_name for a in chosen}), untie=untie)
    except BaseException:
        for attached in premerged:
            attached.module.merged = False
        raise
    for attached in chosen:
        attached.module.merged = False  # the weights keep the update: detach must not take it out again
        if rewritten_by(state, attached):
            del state.originals[attached.path]  # the residual plus the update is the weight now, for good
    untied = [path for path in state.untied if path in {a.path for a in chosen}]
    for path in untied:
        del state.untied[path]  # the copies stay: they hold the merged update now
    if untied:
        config = getattr(model, "config", None)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        for holder in {id(c): c for c in (config, text_config) if c is not None}.values():
            if getattr(holder, "tie_word_embeddings", False):
                holder.tie_word_embeddings = False
    detach(model, sorted({a.adapter_name for a in chosen}))
    return model if dequantize is None else install_dequantized(model, replacements, dequantize)


def fold(model: nn.Module) -> nn.Module:
    """Collapse training-time reparametrisations (e.g. a prefix produced by an MLP) into the plain parameters they
    produce, for inference and saving; the spec is updated to match, so a saved checkpoint loads as folded."""
    state = require_state(model)
    adapters = dict(state.spec.adapters)
    for attached in state.attached:
        folding = getattr(attached.module, "fold", None)
        changes = folding() if folding is not None else {}
        if changes:
            attached.config = attached.config.model_copy(update=changes)
            entries = list(adapters[attached.adapter_name])
            entries[attached.entry] = attached.config
            adapters[attached.adapter_name] = entries
    state.spec = Spec(adapters=adapters, trainable=state.spec.trainable, compose=state.spec.compose)
    _train_adapters(state)
    return model


@dataclass(frozen=True)
class TrainableParameters:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable: {self.trainable:,} / total: {self.total:,} ({self.percent:.4f}%)"


def trainable_parameters(model: nn.Module) -> TrainableParameters:
    """Counts of parameters that will receive gradients, out of all the model's parameters."""
    seen: set[int] = set()
    trainable = total = 0
    for parameter in model.parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        count = stored_values(parameter)
        total += count
        trainable += count if parameter.requires_grad else 0
    return TrainableParameters(trainable, total)


def stored_values(parameter: torch.Tensor) -> int:
    """How many weight values a parameter stands for: its element count, or for a packed quantised parameter (two
    4-bit values per byte) the shape its quantisation state records."""
    shape = getattr(getattr(parameter, "quant_state", None), "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else parameter.numel()
