"""BitFit: train only the bias terms (Ben Zaken et al. 2022, arXiv:2106.10199).

Each targeted bias ``b`` gets a trainable delta δ (zero at init) and the module computes with ``b + δ``; the base's
bias never changes, and merging adds δ to it. The target selects biases by parameter path, ``*.bias`` (every bias
of the model) by default, or ``*attention*.bias``, ``re:.*\\.(query|value)\\.bias`` and so on; a module without a
bias has no such path, so a target whose modules have none (Llama's projections) is refused by name, listing the
closest biases there are. Adding a bias to a module that has none is not offered: it would change the base's own
state dict. The vectors are the method's whole parameter count, about 0.1 % of a BERT.
"""

from __future__ import annotations

from typing import Literal

from peftkit_methods.vector_delta import VectorDeltaAdapter, vector_count
from pydantic import Field
from torch import nn

from peftkit import Capabilities, Method, MethodConfig
from peftkit.sites import VectorsSite


class BitFitConfig(MethodConfig):
    method: Literal["bitfit"] = "bitfit"
    target: str | list[str] = Field(default="*.bias", description="bias paths (a glob or 're:' regex)")


class BitFit(Method):
    name = "bitfit"
    config = BitFitConfig
    capabilities = Capabilities(
        site="vector",
        module_types=(nn.Module,),  # any module with a bias
        mergeable=True,
        identity_at_init=True,
        compose_rules=frozenset({"sum", "stack"}),  # a changed bias adds up with other changes; no gate on it
    )

    @classmethod
    def site_refusal(cls, config: BitFitConfig, site: VectorsSite) -> str | None:
        others = [p.name for p in site.parameters if p.name != "bias"]
        if others:
            return f"BitFit trains biases, and {others} of {type(site.module).__name__} are not; target '*.bias'"
        return None

    @classmethod
    def parameter_count(cls, config: BitFitConfig, site: VectorsSite) -> int:
        return vector_count(site)

    @classmethod
    def create(cls, config: BitFitConfig, site: VectorsSite) -> VectorDeltaAdapter:
        return VectorDeltaAdapter(site)
