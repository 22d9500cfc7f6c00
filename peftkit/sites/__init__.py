"""Sites: the places on a model where an adapter acts, one module per kind, and what each host offers an adapter.

- :mod:`~peftkit.sites.kinds` — the table of site kinds and :func:`make_site` (each kind registers itself there).
- :mod:`~peftkit.sites.weight` — linear-like hosts (nn.Linear, Conv1D, nn.Embedding, nn.Conv2d, registered types).
- :mod:`~peftkit.sites.sublayer` — output and parallel sites around a sub-layer.
- :mod:`~peftkit.sites.attention` — extra keys and values through transformers' attention-function registry.
- :mod:`~peftkit.sites.input` — virtual tokens before the input embeddings.
- :mod:`~peftkit.sites.experts` — fused mixture-of-experts parameters (3-D, one slice per expert).
- :mod:`~peftkit.sites.tied` — which modules hold the same tensor (a tied LM head and input embedding).
- :mod:`~peftkit.sites.structure` and :mod:`~peftkit.sites.placements` — where a model's attention, feed-forward
  and sub-layers are, found from its structure (the ``@place`` targets).

Importing this package registers every built-in kind. The names below are the plugin author's API.
"""

from peftkit.sites.attention import AttentionSite, check_extra_keys, prepend_keys
from peftkit.sites.experts import ExpertParameter, ExpertsSite
from peftkit.sites.input import InputSite
from peftkit.sites.kinds import SiteContext, make_site, register_site_kind, site_kinds
from peftkit.sites.placements import Places, places_of
from peftkit.sites.stream import StreamSite
from peftkit.sites.sublayer import SublayerSite
from peftkit.sites.tied import shared_parameters, tied_holders
from peftkit.sites.vectors import VectorParameter, VectorsSite
from peftkit.sites.weight import (
    Conv1D,
    Conv1DSite,
    Conv2dSite,
    EmbeddingSite,
    LinearSite,
    WeightSite,
    adapts,
    host_class,
    register_weight_site,
    weight_site_types,
    widened,
)

__all__ = [
    "AttentionSite",
    "Conv1D",
    "Conv1DSite",
    "Conv2dSite",
    "EmbeddingSite",
    "ExpertParameter",
    "ExpertsSite",
    "InputSite",
    "LinearSite",
    "Places",
    "SiteContext",
    "StreamSite",
    "SublayerSite",
    "VectorParameter",
    "VectorsSite",
    "WeightSite",
    "adapts",
    "check_extra_keys",
    "host_class",
    "make_site",
    "places_of",
    "prepend_keys",
    "register_site_kind",
    "register_weight_site",
    "shared_parameters",
    "site_kinds",
    "tied_holders",
    "weight_site_types",
    "widened",
]
