"""Named places: where the attention and feed-forward sub-layers of a transformer are, on the model at hand.

Methods name places, not module paths: ``@attention_output`` is "the attention output projection" in every family.
A spec target of the form ``@name`` expands, for the model at hand, to a pattern in peftkit's pattern language that
selects exactly the modules found for that place. They are found from the model's structure
(``peftkit.sites.structure``: its block lists, the modules that compute attention, the projections' widths against the
hidden size), so any transformers model that has the sub-layer has the place; ``EXCEPTIONS`` (keyed by
``config.model_type``) holds what structure cannot tell. A place the model lacks is refused with the reason, and
explicit module paths always work. ``peftkit.plan(model, spec)`` shows what a place selects.

Names:
    input_embeddings      the token embedding (where virtual tokens go): ``model.get_input_embeddings()``
    query, key, value     the self-attention input projections (a fused q/k/v projection, as GPT-2's
                          ``attn.c_attn`` or Phi-3's ``qkv_proj``, is all three)
    self_attention        the module that computes self-attention (where prefix keys and values go)
    attention             the self-attention sub-layer, whose output is added to the residual stream
    attention_output      the self-attention output projection
    ffn                   the feed-forward sub-layer, whose output is added to the residual stream
    ffn_output            the feed-forward output projection (whose input is the intermediate activation)

On an encoder-decoder every attention place is the self-attention of the encoder and of the decoder blocks;
cross-attention is reached with explicit paths (``encoder_attn``, ``EncDecAttention``). ``ffn`` and ``ffn_output``
are every block's feed-forward sub-layer.
"""

from __future__ import annotations

import re

from torch import nn

from peftkit.errors import TargetingError
from peftkit.sites.structure import Layout, read_layout

PLACEMENT_NAMES = (
    "input_embeddings",
    "query",
    "key",
    "value",
    "self_attention",
    "attention",
    "attention_output",
    "ffn",
    "ffn_output",
    "block",
)

_WHAT = {
    "input_embeddings": "token input embedding",
    "query": "self-attention query projection",
    "key": "self-attention key projection",
    "value": "self-attention value projection",
    "self_attention": "self-attention module",
    "attention": "self-attention sub-layer",
    "attention_output": "self-attention output projection",
    "ffn": "feed-forward sub-layer",
    "ffn_output": "feed-forward output projection",
    "block": "repeated transformer block (its output is the residual stream)",
}

# What a family's structure does not tell, keyed by config.model_type: place -> pattern (overriding what is found),
# and (suffix of a host path, suffix of the module whose input is that host's sub-layer input).
# - ALBERT's attention module adds the residual and its LayerNorm after the output projection without taking the
#   residual as an argument (which is how structure tells; BitNet's attention also holds a hidden-size norm, before
#   its output projection).
# - XLM and FlauBERT keep a layer's parts in parallel lists (attentions.N, ffns.N), so no block holds both.
_PARALLEL_LISTS = {"ffn": r"re:(?:.*\.)?ffns\.\d+", "ffn_output": r"re:(?:.*\.)?ffns\.\d+\.lin2"}
EXCEPTIONS: dict[str, dict[str, str]] = {
    "albert": {"attention": "attention.dense"},
    "xlm": _PARALLEL_LISTS,
    "flaubert": _PARALLEL_LISTS,
}
SUBLAYER_INPUT_EXCEPTIONS: dict[str, tuple[tuple[str, str], ...]] = {"albert": (("attention.dense", "attention"),)}


def family_of(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def as_pattern(paths: list[str], every_path: list[str]) -> str:
    """A ``re:`` pattern that selects exactly ``paths`` among ``every_path``: with layer indices as ``\\d+`` when
    that selects nothing else (readable in a plan), else the paths themselves."""

    def general(path: str) -> str:
        return r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in path.split("."))

    alternatives = list(dict.fromkeys(general(p) for p in paths))
    regex = re.compile("|".join(alternatives))
    if {p for p in every_path if regex.fullmatch(p)} != set(paths):
        alternatives = [re.escape(p) for p in paths]
    body = alternatives[0] if len(alternatives) == 1 else "(?:" + "|".join(alternatives) + ")"
    return "re:" + body


class Places:
    """Where the named places are on one model: ``@name`` -> a pattern, and where a sub-layer's input is read.

    Built once per resolve by :func:`places_of` and handed to ``compile_pattern`` and to the sites, so that the
    knowledge of where things are lives here; the model's structure is read on first use and kept.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.family = family_of(model)
        self._layout: Layout | None = None
        self._patterns: dict[str, str] = {}  # asked once per host by some methods (IA3's feedforward check)

    @property
    def layout(self) -> Layout:
        if self._layout is None:
            self._layout = read_layout(self.model)
        return self._layout

    def pattern(self, name: str) -> str:
        """The pattern that ``@name`` stands for on this model; a TargetingError says why when it has none."""
        exception = EXCEPTIONS.get(self.family or "", {}).get(name)
        if exception is not None:
            return exception
        paths = self.layout.paths.get(name)
        if not paths:
            reason = self.layout.reasons.get(name, "none was found")
            raise TargetingError(
                f"target '@{name}': peftkit does not know where the {name} of a {self.family or 'non-transformers'!r} "
                f"model ({type(self.model).__name__}) is: it looks for the {_WHAT.get(name, name)}, but {reason}; give explicit "
                "module paths as the target instead"
            )
        if name not in self._patterns:
            self._patterns[name] = as_pattern(paths, [p for p, _ in self.model.named_modules() if p])
        return self._patterns[name]

    def hidden_size(self, path: str) -> int | None:
        """The hidden size of the block around the ``@attention`` or ``@ffn`` host at ``path`` (the sub-layer maps
        it to itself), or None where structure did not find one: a width to trust over the host's first and last
        projections, which in a mixture of experts are a router and a shared expert's gate."""
        return self.layout.widths.get(path)

    def sublayer_input_path(self, path: str) -> str:
        """The path of the module whose input is the sub-layer input for a host at ``path`` (often the host)."""
        for host_suffix, source_suffix in SUBLAYER_INPUT_EXCEPTIONS.get(self.family or "", ()):
            if path == host_suffix or path.endswith("." + host_suffix):
                return path[: len(path) - len(host_suffix)] + source_suffix
        return self.layout.sources.get(path, path)


def places_of(model: nn.Module) -> Places:
    return Places(model)


def expand(pattern: str, places: Places | None) -> str:
    """The module pattern a ``@name`` placement stands for on the model of ``places``; other patterns pass through."""
    if not pattern.startswith("@") or places is None:
        return pattern
    return places.pattern(pattern[1:])
