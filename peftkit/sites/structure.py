"""A transformers model's layout, read from its modules: its blocks and their attention and feed-forward sub-layers.

transformers names its sub-layers differently in every family (``self_attn``, ``attention.self``, ``SelfAttention``,
``self_attention``...) but builds them alike, and that is what is read here:

- **Blocks** are the entries of an ``nn.ModuleList`` that hold an attention module: the nearest such entry whose list
  repeats one class (T5's per-block ``layer`` list mixes classes and is looked through), else the outermost one.
- **Attention modules** are those whose forward looks the attention function up in ``ALL_ATTENTION_FUNCTIONS`` (how
  transformers 4.48+ computes attention) or, in older modeling code, a class named ``...Attention`` that holds its
  own projections. The innermost one is where attention is computed.
- **Projections** are ``nn.Linear`` (and subclasses) and GPT-2's ``Conv1D``. Their widths against the block's hidden
  size tell the attention output (to the hidden size) from a fused q/k/v projection (wider), and a feed-forward
  output projection (intermediate -> hidden) from its input projections. Names are read only where widths cannot
  tell: which of three hidden -> hidden projections is the query, and whether an attention module is cross-attention.
- **Everything else in a block that holds a weight** (outside its attention sub-layers) is its feed-forward part,
  including a mixture-of-experts router and fused expert weights, grouped by the block's child it sits in; a group
  holding a convolution mixes along the sequence (Mamba, a conformer's convolution) and is left out.
- A module **adds the residual itself** when its forward takes the residual (``residual``, ``input_tensor``: BERT's
  ``BertOutput``, BLOOM's attention and MLP) or, outside attention, it holds a norm over the hidden stream (T5's
  ``T5LayerFF``, MPNet's ``MPNetAttention``). The sub-layer whose output is added to the residual stream is then the output projection inside it,
  and its input is read where the sub-layer starts.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from peftkit.keys import ADAPTER_CONTAINER
from peftkit.sites.attention import dispatches_through_registry

try:  # GPT-2 and a few other transformers models use a transposed linear layer
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None  # type: ignore[assignment,misc]

_ATTENTION_CLASS = re.compile(r"attention|attn", re.IGNORECASE)
_RESIDUAL_ARGUMENTS = {"residual", "input_tensor"}
# Name tokens that say nothing about a projection's role (``q_proj``, ``q_lin``, ``query_proj``).
_FILLER = {"proj", "lin", "linear", "projection", "project"}
_ROLES = {
    "query": ({"q"}, {"query"}, {"wq"}),
    "key": ({"k"}, {"key"}, {"wk"}),
    "value": ({"v"}, {"value"}, {"wv"}),
}
_OUTPUT_NAMES = ({"o"}, {"out"}, {"output"}, {"dense"}, {"c"}, {"wo"})
_QK_NORM = {"q", "k", "query", "key"}


@dataclass
class Layout:
    """What was found: module paths per place (in model order), why a place was not found, and where each host
    whose sub-layer input is not its own input reads that input."""

    paths: dict[str, list[str]] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    widths: dict[str, int] = field(default_factory=dict)  # module path -> the hidden size of its block

    def add(self, place: str, path: str, hidden: int | None = None) -> None:
        found = self.paths.setdefault(place, [])
        if path not in found:
            found.append(path)
        if hidden is not None:
            self.widths[path] = hidden


def projection_sizes(module: nn.Module) -> tuple[int, int] | None:
    """(features in, features out) of a linear projection, or None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if Conv1D is not None and isinstance(module, Conv1D):
        return tuple(module.weight.shape)  # type: ignore[return-value]  # stored as (in, out)
    return None


def tokens(name: str) -> set[str]:
    """``q_proj`` -> {q, proj}; ``EncDecAttention`` -> {enc, dec, attention}; ``Wqkv`` -> {wqkv}."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name)
    return {t for t in re.split(r"[^a-z0-9]+", spaced.lower()) if t}


def roles_of(name: str) -> set[str]:
    """Which of query, key and value a projection named ``name`` computes (all three when fused, none if unsure)."""
    words = tokens(name)
    if words & {"qkv", "wqkv"} or {"q", "k", "v"} <= words or {"query", "key", "value"} <= words:
        return {"query", "key", "value"}
    if words == {"c", "attn"}:  # GPT-2 and GPT-BigCode
        return {"query", "key", "value"}
    words -= _FILLER
    if words > {"b"}:  # latent attention's up-projections: q_b_proj (the query), kv_b_proj (keys and values)
        words -= {"b"}
    if words in ({"kv"}, {"wkv"}, {"key", "value"}):
        return {"key", "value"}
    return {role for role, spellings in _ROLES.items() if any(words == spelling for spelling in spellings)}


@functools.cache
def _forward_arguments(module_type: type[nn.Module]) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(module_type.forward).parameters)
    except (TypeError, ValueError):
        return frozenset()


def _inside(path: str, ancestor: str) -> bool:
    return path == ancestor or path.startswith(ancestor + ".")


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _norm_width(path: str, module: nn.Module) -> int | None:
    """The width a normalisation layer normalises, or None for other modules and for per-head q/k norms."""
    if not (isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.endswith("Norm")):
        return None
    if tokens(path.rsplit(".", 1)[-1]) & _QK_NORM:
        return None
    shape = getattr(module, "normalized_shape", None) or getattr(getattr(module, "weight", None), "shape", None)
    return int(tuple(shape)[-1]) if shape else None


class _Reader:
    """One pass over one model's modules; every question below is answered from these tables."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = {p: m for p, m in model.named_modules() if p and ADAPTER_CONTAINER not in p.split(".")}
        self.order = {path: index for index, path in enumerate(self.modules)}
        self.sizes = {p: s for p, m in self.modules.items() if (s := projection_sizes(m)) is not None}
        self.lists = {p for p, m in self.modules.items() if isinstance(m, nn.ModuleList)}
        self.cores: set[str] = set()

    def projections(self, within: str, exclude: tuple[str, ...] = ()) -> list[str]:
        return [p for p in self.sizes if _inside(p, within) and not any(_inside(p, e) for e in exclude)]

    def children(self, path: str) -> list[tuple[str, nn.Module]]:
        return [(name, child) for name, child in self.modules[path].named_children() if name != ADAPTER_CONTAINER]

    # -- attention modules and blocks -------------------------------------------------------------------------------

    def attention_modules(self) -> list[str]:
        def computes_attention(path: str, module: nn.Module) -> bool:
            if dispatches_through_registry(type(module)):
                return True
            direct = [c for _, c in self.children(path) if projection_sizes(c) is not None]
            return bool(_ATTENTION_CLASS.search(type(module).__name__)) and len(direct) >= 1

        found = [p for p, m in self.modules.items() if computes_attention(p, m)]
        self.cores = {p for p in found if not any(q != p and _inside(q, p) for q in found)}  # the innermost
        return [p for p in found if p in self.cores]

    def block_of(self, path: str) -> str | None:
        """The repeated block a module sits in (see the module docstring), or None outside any module list."""
        entries = [a for a in self.ancestors(path) if _parent(a) in self.lists]
        for entry in entries:  # nearest first
            siblings = list(self.modules[_parent(entry)].children())
            if len({type(s) for s in siblings}) == 1:
                return entry
        return entries[-1] if entries else None

    def ancestors(self, path: str) -> list[str]:
        """``path`` and the modules above it, nearest first."""
        chain = []
        while path:
            if path in self.modules:
                chain.append(path)
            path = _parent(path)
        return chain

    def hidden_size(self, block: str, cores: list[str]) -> int | None:
        """The width of the block's residual stream: what its norms normalise (outside attention, where DeepSeek
        normalises its compressed queries and keys), else the input width its projections share most."""
        norms = [
            width
            for path, module in self.modules.items()
            if _inside(path, block) and not any(_inside(path, c) for c in cores)
            if (width := _norm_width(path, module)) is not None
        ]
        inputs = [self.sizes[p][0] for p in self.projections(block)]
        widths = [w for w in norms if w in inputs] or inputs
        return Counter(widths).most_common(1)[0][0] if widths else None

    def is_cross_attention(self, path: str, block: str) -> bool:
        module = self.modules[path]
        if getattr(module, "is_cross_attention", False) is True:
            return True
        words: set[str] = tokens(type(module).__name__)
        for part in path[len(block) + 1 :].split("."):
            words |= tokens(part)
        return bool(
            words & {"cross", "crossattention", "encdec"}
            or {"enc", "dec"} <= words
            or {"encoder", "attn"} <= words
            or {"encoder", "attention"} <= words
        )

    # -- sub-layers -------------------------------------------------------------------------------------------------

    def group_of(self, path: str, block: str) -> str:
        """The block's child that ``path`` sits in; for a child that is a module list, the list's entry."""
        parts = path[len(block) + 1 :].split(".")
        group = f"{block}.{parts[0]}"
        if group in self.lists and len(parts) > 1:
            group = f"{group}.{parts[1]}"
        return group

    def holds_experts(self, path: str, hidden: int) -> bool:
        """Whether the module holds fused expert weights: (experts, out, in) with the hidden size on one side."""
        return any(
            w.dim() == 3 and w.shape[0] > 1 and hidden in tuple(w.shape[1:])
            for w in self.modules[path].parameters(recurse=False)
        )

    def output_projections(self, parts: list[str], hidden: int) -> list[str]:
        """The projections back to the hidden size from another width (intermediate -> hidden); when the widths are
        equal, the last projection to the hidden size in each module."""
        projections = [p for p in parts if p in self.sizes]
        downs = [p for p in projections if self.sizes[p][1] == hidden and self.sizes[p][0] != hidden]
        if downs:
            return downs
        last: dict[str, str] = {}
        for p in projections:
            if self.sizes[p][1] == hidden:
                last[_parent(p)] = p
        return list(last.values())

    def adds_residual(self, path: str, hidden: int, norms: bool = True) -> bool:
        """Whether the module's output already has the residual added (see the module docstring). A norm inside
        attention comes before the output projection (BitNet's sub-norm), and a mixture of experts may norm its
        output (A.X-K1): there only the forward's arguments tell."""
        if _forward_arguments(type(self.modules[path])) & _RESIDUAL_ARGUMENTS:
            return True
        if not norms or path in self.cores:
            return False
        return any(_norm_width(name, child) == hidden for name, child in self.children(path))

    def attention_sublayer(self, core: str, block: str, hidden: int, cores: list[str]) -> str:
        """The largest module around ``core`` that is still only this attention (with its output projection)."""
        sublayer = core
        for ancestor in self.ancestors(_parent(core)):
            if ancestor == block or ancestor in self.lists or any(_inside(c, ancestor) for c in cores if c != core):
                break
            outside = self.projections(ancestor, exclude=(core,))
            if any(self.sizes[p][1] != hidden for p in outside):  # a feed-forward input projection: too far
                break
            sublayer = ancestor
        return sublayer

    def host(self, sublayer: str, output: str, hidden: int) -> str:
        """The highest module from ``output`` up to ``sublayer`` whose output is not yet added to the residual."""
        host = output
        for ancestor in self.ancestors(_parent(output)):
            if not _inside(ancestor, sublayer) or self.adds_residual(ancestor, hidden):
                break
            host = ancestor
        return host


def _attention_places(reader: _Reader, layout: Layout, core: str, sublayer: str, hidden: int) -> None:
    """The places of one self-attention: ``core`` computes it, ``sublayer`` is it with its output projection."""
    layout.add("self_attention", core)
    # A projection is named by the core's child that holds it alone (Gemma 4 wraps its nn.Linear as q_proj.linear);
    # a child holding several is a module of its own (DeepSeek-V3.2's indexer has its own wk), not q, k or v.
    inside = reader.projections(core)
    holder = {p: core + "." + p[len(core) + 1 :].split(".")[0] for p in inside}
    alone = {p for p in inside if sum(h == holder[p] for h in holder.values()) == 1}
    roles = {p: roles_of(holder[p].rsplit(".", 1)[-1]) if p in alone else set() for p in inside}
    if not any(roles.values()):
        wide = [p for p in alone if reader.sizes[p][1] > hidden]
        if len(wide) == 1 and len(alone) <= 2:  # one wide projection (and the output): q, k and v fused
            roles[wide[0]] = {"query", "key", "value"}
    for place in ("query", "key", "value"):
        computing = [p for p, r in roles.items() if place in r]
        if computing:
            layout.add(place, computing[0])
        else:
            layout.reasons.setdefault(
                place, f"no projection of {type(reader.modules[core]).__name__} is named as the {place}"
            )
    taken = {p for p, r in roles.items() if r}
    candidates = [
        p
        for p in reader.projections(sublayer)
        if p not in taken and reader.sizes[p][1] == hidden and (p in alone or not _inside(p, core))
    ]
    outside = [p for p in candidates if not _inside(p, core)]
    candidates = outside or candidates
    named = [p for p in candidates if tokens(holder.get(p, p).rsplit(".", 1)[-1]) - _FILLER in _OUTPUT_NAMES]
    output = (named or candidates)[-1] if candidates else None
    if output is None:
        layout.reasons.setdefault(
            "attention_output", f"{type(reader.modules[core]).__name__} holds no projection back to the hidden size"
        )
        if not reader.adds_residual(sublayer, hidden):
            layout.add("attention", sublayer, hidden)
        return
    layout.add("attention_output", output)
    host = reader.host(sublayer, output, hidden)
    layout.add("attention", host, hidden)
    if not _inside(core, host):  # BERT's attention.output.dense: the sub-layer input is what attention.self reads
        layout.sources[host] = core


def _feedforward_places(reader: _Reader, layout: Layout, block: str, sublayers: list[str], hidden: int) -> bool:
    """The block's feed-forward places; True when its experts' weights are fused parameters rather than modules.

    The block's weighted modules outside its attention are grouped by the block's child they sit in (through T5's
    list of sub-layers). A group that holds both an input projection and an output projection (or fused experts) is
    a feed-forward module of its own (Llama's ``mlp``, T5's ``DenseReluDense``, a mixture of experts with its router
    and shared expert); what is left, when it is one input and one output projection side by side (BERT's
    ``intermediate`` and ``output``, OPT's ``fc1`` and ``fc2``), is a feed-forward sub-layer with no module of its own.
    A group holding a convolution mixes along the sequence (a Mamba or conformer convolution block) and is no
    feed-forward.
    """
    groups: dict[str, list[str]] = {}
    for path, module in reader.modules.items():
        if not _inside(path, block) or path == block or any(_inside(path, s) for s in sublayers):
            continue
        if isinstance(module, nn.Embedding) or not any(p.dim() >= 2 for p in module.parameters(recurse=False)):
            continue
        groups.setdefault(reader.group_of(path, block), []).append(path)
    fused = False
    loose: list[str] = []
    for parts in groups.values():
        if any(isinstance(reader.modules[p], (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for p in parts):
            continue
        experts = [p for p in parts if reader.holds_experts(p, hidden)]
        downs = reader.output_projections(parts, hidden)
        inputs = [p for p in parts if p in reader.sizes and reader.sizes[p][0] == hidden and p not in downs]
        if not (experts or (downs and inputs)):
            loose.extend(parts)
            continue
        fused = fused or bool(experts)
        if experts:
            layout.reasons.setdefault(
                "ffn_output",
                f"its experts' output projections are fused parameters of {type(reader.modules[experts[0]]).__name__}"
                f" ({experts[0]}), not modules",
            )
        for down in downs:
            layout.add("ffn_output", down)
        container = _common_ancestor(parts) if len(parts) > 1 else _parent(parts[0])
        if container == block or container in reader.lists:
            continue
        if not reader.adds_residual(container, hidden, norms=not experts):
            layout.add("ffn", container, hidden)
        elif len(downs) == 1:  # BLOOM's MLP adds the residual: its output projection, input read at its entry
            host = reader.host(container, downs[0], hidden)
            layout.add("ffn", host, hidden)
            layout.sources[host] = container
    downs = reader.output_projections(loose, hidden)
    if len(downs) != 1:
        return fused
    # No module holds the feed-forward part alone: the sub-layer is its output projection, read from where the
    # input projection starts.
    down = downs[0]
    ups = [
        p for p in loose if p in reader.sizes and reader.sizes[p][0] == hidden and reader.order[p] < reader.order[down]
    ]
    if not ups:
        return fused
    layout.add("ffn_output", down)
    host = down
    for ancestor in reader.ancestors(_parent(down)):
        if (
            ancestor == block
            or any(_inside(p, ancestor) for p in loose if p != down)
            or reader.adds_residual(ancestor, hidden)
        ):
            break
        host = ancestor
    source = ups[-1]
    for ancestor in reader.ancestors(_parent(source)):
        if ancestor == block or _inside(down, ancestor):
            break
        source = ancestor
    layout.add("ffn", host, hidden)
    layout.sources[host] = source
    return fused


def _common_ancestor(paths: list[str]) -> str:
    split = [p.split(".") for p in paths]
    common = []
    for parts in zip(*split):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)


def read_layout(model: nn.Module) -> Layout:
    """The places of ``model`` found from its structure (see the module docstring)."""
    reader = _Reader(model)
    layout = Layout()
    getter = getattr(model, "get_input_embeddings", None)
    try:
        embeddings = getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        embeddings = None
    if isinstance(embeddings, nn.Embedding):
        path = next((p for p, m in reader.modules.items() if m is embeddings), None)
        if path is not None:
            layout.add("input_embeddings", path)
    elif embeddings is not None:
        layout.reasons["input_embeddings"] = (
            f"its input embedding is a {type(embeddings).__name__}, not a token embedding"
        )
    elif callable(getter):
        layout.reasons["input_embeddings"] = "get_input_embeddings() gives none"
    else:
        layout.reasons["input_embeddings"] = f"{type(model).__name__} has no get_input_embeddings()"
    cores = reader.attention_modules()
    blocks: dict[str, list[str]] = {}
    for core in cores:
        block = reader.block_of(core)
        if block is not None:
            blocks.setdefault(block, []).append(core)
    if not blocks:
        for place in ("query", "key", "value", "self_attention", "attention", "attention_output", "ffn", "ffn_output"):
            layout.reasons[place] = "no attention module was found in a list of repeated blocks"
    fused_experts = False
    for block, in_block in sorted(blocks.items(), key=lambda item: reader.order[item[0]]):
        hidden = reader.hidden_size(block, in_block)
        if hidden is None:
            continue
        if block not in in_block:  # the repeated block itself (its output the residual stream), unless the list
            layout.add("block", block, hidden)  # holds attentions alone, parallel to the feed-forwards (XLM)
        sublayers = []
        for core in in_block:
            sublayer = reader.attention_sublayer(core, block, hidden, in_block)
            sublayers.append(sublayer)
            if reader.is_cross_attention(core, block):
                continue
            _attention_places(reader, layout, core, sublayer, hidden)
        fused_experts |= _feedforward_places(reader, layout, block, sublayers, hidden)
    if fused_experts:  # the projections that are modules (dense layers, a shared expert) are only part of it
        layout.paths.pop("ffn_output", None)
    return layout
