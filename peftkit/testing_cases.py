"""The generated cases of the conformance suite (:mod:`peftkit.testing`): small host models of every family, an
input for each, and a spec entry whose selector hits modules the method can adapt, as its configuration allows.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st
from torch import nn

import peftkit
from peftkit.errors import TargetingError
from peftkit.method import MethodConfig
from peftkit.patterns import compile_pattern
from peftkit.registry import get_method
from peftkit.sites.kinds import make_site, targets_parameters
from peftkit.sites.placements import PLACEMENT_NAMES, places_of
from peftkit.sites.weight import Conv1D, adapts
from peftkit.targeting import base_modules, candidates_for, layer_indices, site_context


@dataclass
class Case:
    """A generated host model (rebuilt identically on demand), its input, and a spec entry targeting it."""

    family: str
    build: Callable[[], nn.Module]
    inputs: Any
    entry: dict[str, Any]
    dtype: torch.dtype

    def fresh(self) -> nn.Module:
        return self.build()

    def spec(self) -> dict[str, Any]:
        return {"adapters": {"default": [self.entry]}}

    def run(self, model: nn.Module) -> torch.Tensor:
        if isinstance(self.inputs, dict):
            output = model(**self.inputs)
            if hasattr(output, "logits"):
                return output.logits
            # an encoder without a head: its pooler is a host too, so its output counts
            parts = [output.last_hidden_state, getattr(output, "pooler_output", None)]
            return torch.cat([part.flatten() for part in parts if part is not None])
        return model(self.inputs)


def _seeded(factory: Callable[[], nn.Module], seed: int, dtype: torch.dtype) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            if factory in QUANTIZED_FACTORIES:  # packed weights: no dtype cast; train mode (see _quantized_family)
                return factory()
            return factory().to(dtype).eval()

    return build


def _quantized_mlp() -> nn.Module:
    """bitsandbytes NF4 then int8 linears (64 wide: its CPU kernels block by 64 inputs), float32 compute. Kept in
    train mode: in eval mode bitsandbytes' CPU inference repacks a 4-bit weight in place and computes in bf16."""
    import bitsandbytes as bnb

    first = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4")
    second = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False)
    return nn.Sequential(first, nn.Tanh(), second).to("cpu")  # .to quantises the weights


QUANTIZED_FACTORIES: frozenset[Callable[[], nn.Module]] = frozenset({_quantized_mlp})


def _quantized_family(draw: st.DrawFn) -> tuple[Callable[[], nn.Module], Any]:
    return _quantized_mlp, ("randn", (2, draw(st.integers(1, 3)), 64))


# Host families: each draws a small model holding some linear-like module types, and an input for it.
def _mlp_family(draw: st.DrawFn) -> tuple[Callable[[], nn.Module], Any]:
    sizes = draw(st.lists(st.integers(1, 24), min_size=2, max_size=4))
    lead = draw(st.lists(st.integers(1, 3), min_size=1, max_size=2))
    return (lambda: peftkit.zoo.TINY_MODELS["mlp"](sizes=sizes)), ("randn", (*lead, sizes[0]))


def _conv1d_family(draw: st.DrawFn) -> tuple[Callable[[], nn.Module], Any]:
    from transformers.pytorch_utils import Conv1D

    d0, d1, d2 = (draw(st.integers(1, 24)) for _ in range(3))
    return (lambda: nn.Sequential(Conv1D(d1, d0), nn.Tanh(), Conv1D(d2, d1))), ("randn", (2, 3, d0))


def _embedding_family(draw: st.DrawFn) -> tuple[Callable[[], nn.Module], Any]:
    vocab, dim, out = draw(st.integers(2, 40)), draw(st.integers(1, 24)), draw(st.integers(1, 16))
    return (lambda: nn.Sequential(nn.Embedding(vocab, dim), nn.Linear(dim, out))), ("ids", (2, 5), vocab)


def _conv2d_family(draw: st.DrawFn) -> tuple[Callable[[], nn.Module], Any]:
    c0, c1, c2 = (draw(st.integers(1, 6)) for _ in range(3))
    kernel, stride, padding = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(0, 1))
    # built inside the factory: every fresh() is a new model, never the modules of an earlier one
    return (lambda: nn.Sequential(nn.Conv2d(c0, c1, kernel, stride, padding), nn.Tanh(), nn.Conv2d(c1, c2, 1))), (
        "randn",
        (2, c0, 7, 6),
    )


def _transformer_family(name: str) -> Callable[[st.DrawFn], tuple[Callable[[], nn.Module], Any]]:
    def family(draw: st.DrawFn) -> tuple[Callable[[], nn.Module], Any]:
        return (lambda: peftkit.zoo.TINY_MODELS[name]()), ("ids", (2, draw(st.integers(2, 8))), 128)  # 2+: q acts

    return family


FAMILIES: dict[str, Callable[[st.DrawFn], tuple[Callable[[], nn.Module], Any]]] = {
    "mlp": _mlp_family,
    "conv1d": _conv1d_family,
    "embedding": _embedding_family,
    "conv2d": _conv2d_family,
    "gpt2": _transformer_family("gpt2-tiny"),
    "llama": _transformer_family("llama-tiny"),
    "bert": _transformer_family("bert-tiny"),
    "qwen3-moe": _transformer_family("qwen3-moe-tiny"),  # fused 3-D expert parameters
}
if importlib.util.find_spec("bitsandbytes") is not None:  # quantised hosts, where bitsandbytes is installed
    FAMILIES["quantized"] = _quantized_family


def _make_input(recipe: tuple, seed: int, dtype: torch.dtype) -> Any:
    generator = torch.Generator().manual_seed(seed)
    if recipe[0] == "randn":
        return torch.randn(recipe[1], generator=generator).to(dtype)
    ids = torch.randint(0, recipe[2], recipe[1], generator=generator)
    ids[0, :2] = torch.arange(2)  # the smallest ids always occur: methods that act on chosen ids are exercised
    return ids if recipe[2] != 128 else {"input_ids": ids}


def _tied_paths(model: nn.Module) -> set[str]:
    """Modules whose weight is shared with another module (e.g. a tied LM head): merging into them is ambiguous."""
    owners: dict[int, list[str]] = {}
    for path, module in base_modules(model).items():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            owners.setdefault(id(weight), []).append(path)
    return {path for paths in owners.values() if len(paths) > 1 for path in paths}


def _hosts(model: nn.Module, modules: dict[str, nn.Module], method: type, config: MethodConfig) -> list[str]:
    """Paths the configured method can be put on: weight sites anywhere they build and the configuration fits
    (``site_refusal``); other kinds on a projection or a place named in the family table (a sub-layer whose input
    and output are the hidden stream)."""
    capabilities = method.capabilities_for(config)
    tied, found = _tied_paths(model), places_of(model)
    places = []
    for name in PLACEMENT_NAMES:
        try:
            places.append(compile_pattern(f"@{name}", found))
        except TargetingError:  # a place this model does not have
            continue
    projections = (nn.Linear, Conv1D)
    hosts = []
    for path, module in candidates_for(method, modules).items():
        if not adapts(module, capabilities.module_types) or path in tied:
            continue
        elsewhere = capabilities.site != "weight" and not targets_parameters(capabilities.site)
        if elsewhere and not (isinstance(module, projections) or any(m(path) for m in places)):
            continue
        site = make_site(capabilities.site, module, site_context(method, path, modules, found, model))
        if not isinstance(site, str) and not method.site_refusal(config, site):
            hosts.append(path)
    return hosts


@st.composite
def cases(draw: st.DrawFn, method: str, configs: st.SearchStrategy[dict[str, Any]]) -> Case:
    """A host model with at least one module the method adapts, and a generated selector for some of them."""
    accepted = get_method(method).capabilities.module_types
    fields = draw(configs)
    config = get_method(method).config.model_validate({"method": method, "target": "*", **fields})
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.float64, torch.bfloat16]))
    seed = draw(st.integers(0, 2**16))
    for family in draw(st.permutations(sorted(FAMILIES))):
        factory, recipe = FAMILIES[family](draw)
        family_dtype = torch.float32 if factory in QUANTIZED_FACTORIES else dtype  # packed weights, fp32 compute
        build = _seeded(factory, seed, family_dtype)
        model = build()
        hosts = _hosts(model, base_modules(model), get_method(method), config)
        modules = candidates_for(get_method(method), base_modules(model))  # what the selectors are matched against
        if hosts:
            break
    else:
        raise AssertionError(f"no generated host family holds a module that {method!r} adapts ({accepted})")
    chosen = draw(st.lists(st.sampled_from(hosts), min_size=1, max_size=len(hosts), unique=True))
    layers = layer_indices(model)
    style = draw(st.sampled_from(["regex", "suffix", "types", "layers"]))
    entry: dict[str, Any] = {"method": method}
    if style == "suffix":  # a suffix glob, kept only if every path it hits is a host
        tail = chosen[0].rsplit(".", 1)[-1]
        hits = [p for p in modules if p == tail or p.endswith("." + tail)]
        style = "suffix" if hits and all(p in hosts for p in hits) else "regex"
        entry["target"] = tail
    if style == "types":
        kind = type(modules[chosen[0]]).__name__
        if all(p in hosts for p, m in modules.items() if type(m).__name__ == kind):
            entry.update(target="*", module_types=[kind])
        else:
            style = "regex"
    if style == "layers" and chosen[0] in layers:
        layer = layers[chosen[0]]
        pattern = re.sub(rf"\.{layer}\.", ".*.", chosen[0], count=1)
        same = [p for p in hosts if re.fullmatch(re.escape(pattern).replace(r"\*", ".*"), p)]
        entry.update(target=pattern, layers=f"{layer}-{layer}" if same else [layer])
    elif style in {"layers", "regex"}:
        entry["target"] = ["re:" + re.escape(p) for p in chosen]
    entry.update(fields)
    return Case(family, build, _make_input(recipe, seed + 1, family_dtype), entry, family_dtype)
