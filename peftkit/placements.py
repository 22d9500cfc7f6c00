"""Per-family facts: where the attention and feed-forward sub-layers of a transformer are.

Methods name places, not module paths: ``@attention_output`` is "the attention output projection" in every family.
A spec target of the form ``@name`` expands, for the model at hand, to a pattern in peftkit's pattern language.
These facts live in this one table (keyed by transformers' ``config.model_type``) instead of in branches through
the core; a model whose family is not listed can always be targeted with explicit module paths.

Names:
    input_embeddings      the token embedding (where virtual tokens go)
    query, key, value     the attention input projections (GPT-2 fuses all three in ``attn.c_attn``)
    self_attention        the module that computes attention (where prefix keys and values go)
    attention             the attention sub-layer, whose output is added to the residual stream
    attention_output      the attention output projection
    ffn                   the feed-forward sub-layer, whose output is added to the residual stream
    ffn_output            the feed-forward output projection (whose input is the intermediate activation)
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

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
)

_LLAMA_LIKE = {
    "input_embeddings": "embed_tokens",
    "query": "self_attn.q_proj",
    "key": "self_attn.k_proj",
    "value": "self_attn.v_proj",
    "self_attention": "self_attn",
    "attention": "self_attn",
    "attention_output": "self_attn.o_proj",
    "ffn": "mlp",
    "ffn_output": "mlp.down_proj",
}
_BERT_LIKE = {
    "input_embeddings": "word_embeddings",
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "self_attention": "attention.self",
    # BERT adds the residual inside BertSelfOutput/BertOutput (dense -> dropout -> LayerNorm(x + residual)), so a
    # sub-layer's output before the residual is its dense projection; its input is read at the sub-layer's entry.
    "attention": "attention.output.dense",
    "attention_output": "attention.output.dense",
    "ffn": r"re:.*\.layer\.\d+\.output\.dense",
    "ffn_output": r"re:.*\.layer\.\d+\.output\.dense",
}

PLACEMENTS: dict[str, dict[str, str]] = {
    "gpt2": {
        "input_embeddings": "wte",
        "query": "attn.c_attn",
        "key": "attn.c_attn",
        "value": "attn.c_attn",
        "self_attention": "attn",
        "attention": "attn",
        "attention_output": "attn.c_proj",
        "ffn": "mlp",
        "ffn_output": "mlp.c_proj",
    },
    **{family: _LLAMA_LIKE for family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "smollm3")},
    **{family: _BERT_LIKE for family in ("bert", "roberta", "xlm-roberta", "camembert", "electra")},
}

# Where a sub-layer's input is read when its output is taken from a module deeper inside it, as
# (suffix of the host path, suffix of the module whose input is the sub-layer's input), longest suffix first.
SUBLAYER_INPUTS: dict[str, tuple[tuple[str, str], ...]] = {
    family: (("attention.output.dense", "attention.self"), ("output.dense", "intermediate"))
    for family in ("bert", "roberta", "xlm-roberta", "camembert", "electra")
}


def family_of(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


class Places:
    """Where the named places are on one model: ``@name`` -> a pattern, and where a sub-layer's input is read.

    Built once per model by :func:`places_of` and handed to ``compile_pattern`` and to the sites, so that the
    knowledge of where things are lives in this module only.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.family = family_of(model)

    def pattern(self, name: str) -> str:
        """The pattern that ``@name`` stands for on this model; a TargetingError says why when it has none."""
        table: Mapping[str, str] | None = PLACEMENTS.get(self.family or "")
        if table is None:
            from peftkit.errors import TargetingError

            known = ", ".join(sorted(PLACEMENTS))
            raise TargetingError(
                f"target '@{name}': peftkit does not know where the {name} of a "
                f"{self.family or 'non-transformers'!r} model is (known families: {known}); give explicit module "
                "paths as the target instead"
            )
        return table[name]

    def sublayer_input_path(self, path: str) -> str:
        """The path of the module whose input is the sub-layer input for a host at ``path`` (often the host)."""
        for host_suffix, source_suffix in SUBLAYER_INPUTS.get(self.family or "", ()):
            if path == host_suffix or path.endswith("." + host_suffix):
                return path[: len(path) - len(host_suffix)] + source_suffix
        return path


def places_of(model: nn.Module) -> Places:
    return Places(model)


def expand(pattern: str, places: Places | None) -> str:
    """The module pattern a ``@name`` placement stands for on the model of ``places``; other patterns pass through."""
    if not pattern.startswith("@") or places is None:
        return pattern
    return places.pattern(pattern[1:])
