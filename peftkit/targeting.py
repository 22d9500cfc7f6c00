"""Selectors -> a plan: which adapter goes on which module, with how many parameters.

One pattern language: a glob matched against the full dotted module path or any dotted suffix of it (so
``q_proj`` hits ``model.layers.0.self_attn.q_proj``), or, with a ``re:`` prefix, a regex that must match the
full path. A module's layer is the index of the transformer block it sits in: the first path component that is an
index into an ``nn.ModuleList`` (e.g. ``transformer.h.3.attn.c_attn`` is in layer 3). Nothing is attached here,
so ``plan`` is a dry run.
"""

from __future__ import annotations

import difflib
from contextlib import suppress
from dataclasses import dataclass, field

from torch import nn

from peftkit.errors import TargetingError
from peftkit.keys import ADAPTER_CONTAINER
from peftkit.method import Method, MethodConfig
from peftkit.patterns import OPTIONAL_PREFIX, compile_pattern, split_optional
from peftkit.registry import get_method
from peftkit.sites.kinds import SiteContext, make_site, targets_parameters
from peftkit.sites.placements import Places, expand, places_of
from peftkit.sites.weight import adapts, host_plugin_hint


def base_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's own modules by path, without peftkit's adapter containers and their contents."""
    modules = {}
    for path, module in model.named_modules():
        if not path or ADAPTER_CONTAINER in path.split("."):
            continue
        modules[path] = module
    return modules


def layer_indices(model: nn.Module) -> dict[str, int]:
    """Module path -> the index of the block (the ModuleList entry) it lives in."""
    indices: dict[str, int] = {}
    lists = {path for path, module in model.named_modules() if isinstance(module, nn.ModuleList)}
    for path in base_modules(model):
        parts = path.split(".")
        for depth in range(1, len(parts)):
            if parts[depth].isdigit() and ".".join(parts[:depth]) in lists:
                indices[path] = int(parts[depth])
                break
    return indices


def closest_paths(pattern: str, paths: list[str], count: int = 3) -> list[str]:
    """The module paths most like ``pattern``, judged on the whole path and on its last component."""
    core = pattern.removeprefix("re:").strip("*.^$")

    def score(path: str) -> float:
        tail = path.rsplit(".", 1)[-1]
        return max(
            difflib.SequenceMatcher(None, core, path).ratio(),
            difflib.SequenceMatcher(None, core, tail).ratio() + 0.01,
        )

    return sorted(paths, key=score, reverse=True)[:count]


@dataclass(frozen=True)
class PlanRow:
    adapter: str
    entry: int
    method: str
    path: str
    module_type: str
    layer: int | None
    parameters: int
    rewrites_base: bool = False  # the adapter changes the host's weight at attach (put back at detach)


@dataclass
class Plan:
    """What ``attach`` would do: one row per (adapter, module), plus base modules kept trainable."""

    rows: list[PlanRow] = field(default_factory=list)
    trainable_modules: list[str] = field(default_factory=list)
    base_parameters: int = 0

    @property
    def adapter_parameters(self) -> int:
        return sum(row.parameters for row in self.rows)

    def __str__(self) -> str:
        headers = ("adapter", "method", "module", "type", "layer", "params")
        body = [
            (
                r.adapter,
                r.method,
                r.path,
                r.module_type,
                "-" if r.layer is None else str(r.layer),
                f"{r.parameters:,}",
            )
            for r in self.rows
        ]
        widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(headers)]
        line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
        lines = [line, "  ".join("-" * w for w in widths)]
        lines += [
            "  ".join(c.rjust(w) if i == 5 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in body
        ]
        share = 100.0 * self.adapter_parameters / self.base_parameters if self.base_parameters else 0.0
        lines.append(
            f"{len(self.rows)} adapted module(s); {self.adapter_parameters:,} adapter parameters "
            f"({share:.4f}% of {self.base_parameters:,} base parameters)"
        )
        rewritten = [r.path for r in self.rows if r.rewrites_base]
        if rewritten:
            lines.append(
                f"base weight changed at attach (a residual; the original comes back at detach) in {len(rewritten)} "
                "module(s): " + ", ".join(rewritten)
            )
        if self.trainable_modules:
            lines.append("trained in full and saved: " + ", ".join(self.trainable_modules))
        return "\n".join(lines)


@dataclass(frozen=True)
class PlannedSite:
    """A plan row together with the live objects ``attach`` needs to build it."""

    row: PlanRow
    method: type[Method]
    config: MethodConfig
    module: nn.Module
    site: object


def candidates_for(method: type[Method], modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """What an entry's patterns are matched against: module paths; for a method whose site kind targets parameters,
    the paths of the own parameters (``model.layers.0.mlp.experts.gate_up_proj``) of the modules it adapts, each
    with its module (so ``*.bias`` selects the biases of those modules, and a module of another type is no
    candidate)."""
    if not targets_parameters(method.capabilities.site):
        return modules
    accepted = method.capabilities.module_types
    return {
        f"{path}.{name}": module
        for path, module in modules.items()
        if adapts(module, accepted)
        for name, parameter in module._parameters.items()
        if parameter is not None
    }


def site_context(
    method: type[Method], path: str, modules: dict[str, nn.Module], places: Places | None, root
) -> SiteContext:
    """The context of a candidate path: a parameter path's site sits on the module holding the parameter."""
    if not targets_parameters(method.capabilities.site):
        return SiteContext(path, modules, places, root)
    owner, _, name = path.rpartition(".")
    return SiteContext(owner, modules, places, root, (name,))


def adaptable_paths(method: type[Method], modules: dict[str, nn.Module], places: Places | None, root) -> list[str]:
    """Every path ``method`` could be put on: the right type, and a site of its kind builds there."""
    accepted = method.capabilities.module_types
    found = []
    for path, module in candidates_for(method, modules).items():
        if adapts(module, accepted):
            site = make_site(method.capabilities.site, module, site_context(method, path, modules, places, root))
            if not isinstance(site, str):
                found.append(path)
    return found


def _no_match_error(where: str, pattern: str, candidates: list[str], places: Places | None) -> TargetingError:
    shown = pattern
    with suppress(TargetingError):  # a place the model lacks was reported already when it was compiled
        shown = expand(split_optional(pattern)[0], places)
    suggestions = ", ".join(repr(p) for p in closest_paths(shown, candidates)) or "(none)"
    return TargetingError(
        f"{where}: target {pattern!r} matched no module this method can adapt; closest: {suggestions}. "
        f"Fix the pattern, or write it as '{OPTIONAL_PREFIX}{pattern}' if it may match nothing on some models"
    )


def _selected_paths(
    where: str,
    method: type[Method],
    config: MethodConfig,
    modules: dict[str, nn.Module],
    layers: dict[str, int],
    places: Places | None,
    root: nn.Module | None,
) -> list[str]:
    """The paths the entry selects; every pattern not marked ``optional:`` must select at least one of them."""
    candidates = candidates_for(method, modules)
    if candidates is not modules:  # a parameter is in its module's layer
        layers = {path: layers[path.rpartition(".")[0]] for path in candidates if path.rpartition(".")[0] in layers}
    matched: list[tuple[str, list[str]]] = []
    for pattern in config.targets:
        match = compile_pattern(pattern, places)
        hits = [path for path in candidates if match(path)]
        if hits:
            matched.append((pattern, hits))
        elif not split_optional(pattern)[1]:
            raise _no_match_error(where, pattern, adaptable_paths(method, modules, places, root), places)
    wanted_layers = None
    if config.layers is not None:
        known = sorted(set(layers.values()))
        if not known:
            raise TargetingError(f"{where}: layers {config.layers} given, but this model has no layer list")
        missing = sorted(set(config.layers) - set(known))
        if missing:
            raise TargetingError(
                f"{where}: layers {missing} do not exist; this model has layers {known[0]}-{known[-1]}"
            )
        wanted_layers = set(config.layers)
    accepted = method.capabilities.module_types
    selected: dict[str, None] = {}
    for pattern, hits in matched:
        kept = hits
        if wanted_layers is not None:
            kept = [p for p in kept if layers.get(p) in wanted_layers]
            if not kept and not split_optional(pattern)[1]:
                raise TargetingError(
                    f"{where}: target {pattern!r} matched {hits[:3]}... but none in layers {config.layers}"
                )
        if config.module_types is not None:
            typed = [p for p in kept if type(candidates[p]).__name__ in config.module_types]
            if not typed and kept and not split_optional(pattern)[1]:
                found = sorted({type(candidates[p]).__name__ for p in kept})
                raise TargetingError(
                    f"{where}: target {pattern!r} matched modules of types {found}, "
                    f"none of module_types {config.module_types}"
                )
            kept = typed
        for path in kept:
            if not adapts(candidates[path], accepted):
                raise TargetingError(
                    f"{where}: target {pattern!r} hits {path!r} ({type(candidates[path]).__name__}), which "
                    f"{config.method!r} cannot adapt; it adapts {', '.join(t.__name__ for t in accepted)}. "
                    "Narrow the target or add module_types." + host_plugin_hint(candidates[path])
                )
            selected[path] = None
    return [path for path in candidates if path in selected]  # in the model's order, whatever the patterns' order


def resolve_entry(
    adapter: str,
    index: int,
    config: MethodConfig,
    modules: dict[str, nn.Module],
    layers: dict[str, int],
    places: Places | None = None,
    root: nn.Module | None = None,
) -> list[PlannedSite]:
    """The sites one spec entry selects, or a TargetingError that says what was found instead.

    Every pattern must select at least one module the method can adapt (a typo in a target list is an error, not
    a silently smaller adapter), unless it is written ``optional:PATTERN``. An entry whose patterns are all
    optional and select nothing adds no sites.
    """
    method = get_method(config.method)
    where = f"adapters.{adapter}.{index} ({config.method})"
    hosts: dict[str, list[str]] = {}  # host module path -> the parameters targeted on it (parameter sites)
    for path in _selected_paths(where, method, config, modules, layers, places, root):
        context = site_context(method, path, modules, places, root)
        hosts.setdefault(context.path, []).extend(context.parameters)
    planned = []
    for path, parameters in hosts.items():
        module = modules[path]
        context = SiteContext(path, modules, places, root, tuple(parameters))
        site = make_site(method.capabilities.site, module, context)
        if isinstance(site, str):
            shown = ", ".join(f"{path}.{name}" for name in parameters) if parameters else path
            raise TargetingError(f"{where}: {shown!r} cannot host {config.method!r}: {site}")
        refusal = method.site_refusal(config, site)
        if refusal:
            raise TargetingError(f"{where}: {path!r} cannot host {config.method!r} as configured: {refusal}")
        site.context = context  # where the host sits, for methods whose behaviour depends on the place
        row = PlanRow(
            adapter,
            index,
            config.method,
            path,
            type(module).__name__ + (f"[{', '.join(parameters)}]" if parameters else ""),
            layers.get(path),
            method.parameter_count(config, site),
            method.capabilities_for(config).rewrites_base,
        )
        planned.append(PlannedSite(row, method, config, module, site))
    return planned


def resolve(model: nn.Module, spec) -> tuple[Plan, list[PlannedSite]]:  # spec: peftkit.Spec
    """Resolve every entry of ``spec`` against ``model``; raises before anything is changed."""
    modules = base_modules(model)
    layers = layer_indices(model)
    places = places_of(model)
    planned: list[PlannedSite] = []
    for adapter, entries in spec.adapters.items():
        seen: dict[str, int] = {}
        for index, config in enumerate(entries):
            for item in resolve_entry(adapter, index, config, modules, layers, places, model):
                if item.row.path in seen:
                    raise TargetingError(
                        f"adapters.{adapter}: entries {seen[item.row.path]} and {index} both target "
                        f"{item.row.path!r}; put the second method in another named adapter"
                    )
                seen[item.row.path] = index
                planned.append(item)
        if not seen:
            raise TargetingError(
                f"adapters.{adapter}: every target is optional and none matched a module of this model, so the "
                "adapter would be empty; name at least one module it can adapt here"
            )
    trainable: list[str] = []
    with_parameters = [path for path, module in modules.items() if next(module.parameters(), None) is not None]
    for pattern in spec.trainable:
        match = compile_pattern(pattern, places)
        hits = [path for path in with_parameters if match(path)]
        if not hits and not split_optional(pattern)[1]:
            raise TargetingError(
                f"trainable: {pattern!r} matched no module with parameters; closest: "
                + ", ".join(repr(p) for p in closest_paths(split_optional(pattern)[0], with_parameters))
                + f". Fix the pattern, or write it as '{OPTIONAL_PREFIX}{pattern}' if it may match nothing"
            )
        trainable.extend(h for h in hits if h not in trainable)
    base = sum(p.numel() for n, p in model.named_parameters() if ADAPTER_CONTAINER not in n.split("."))
    return Plan([p.row for p in planned], trainable, base), planned
