"""bitsandbytes' quantised linear layers as weight-site hosts: QLoRA (Dettmers et al. 2023) and its kin.

``Linear4bit`` (NF4 or FP4, with or without double quantisation) stores W packed in 4-bit blocks with a
``quant_state``; ``Linear8bitLt`` stores int8 rows with one scale each (``SCB``). Both subclass ``nn.Linear`` and
compute ``x Wᵀ + b`` in a compute dtype. A weight-site method needs only the map's shape, its compute dtype and
its device to build an adapter that runs beside the layer (``project_in`` / ``project_out_`` never touch W), so
LoRA, IA3's unmerged scales and the bottleneck adapters work unchanged; the packed weight and its quantisation state
are never written. Reading W (DoRA's norm) dequantises it into a temporary for that computation only. Writing W
(a merge, a PiSSA residual) is refused: folding an update into 4 or 8 bits re-quantises it and loses precision.

Registered through the ``peftkit.hosts`` entry-point group, as a third-party quantisation library would be; it
imports bitsandbytes only when it is installed.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from peftkit.sites import WeightSite, register_weight_site


class QuantizedLinearSite(WeightSite):
    """A bitsandbytes linear layer as the map in_features -> out_features, in its compute dtype."""

    bits: int

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self.in_features, self.out_features = module.in_features, module.out_features

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the layer computes in (adapters live there, never in the storage dtype)."""
        compute = getattr(self.module, "compute_dtype", None)
        return compute if isinstance(compute, torch.dtype) else torch.float32

    def project_out_(self, out: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
        """``out + scale * h Bᵀ``, out of place while autograd records: bitsandbytes returns its output from a
        custom autograd Function, which must not be changed in place."""
        if torch.is_grad_enabled():
            return out + torch.matmul(h, (self._scaled(b).to(h.dtype) * scale).t()).to(out.dtype)
        return super().project_out_(out, h, b, scale)

    def add_dense_update_(
        self, out: torch.Tensor, x: torch.Tensor, delta: torch.Tensor, scale: float = 1.0
    ) -> torch.Tensor:
        return super().add_dense_update_(out.clone() if torch.is_grad_enabled() else out, x, delta, scale)

    def merge_refusal(self) -> str | None:
        return (
            f"its weight is stored in {self.bits} bits ({type(self.module).__name__}): folding an update into it "
            "would re-quantise the weight and lose precision. Run the adapter unmerged (it is as fast), or load the "
            "base in a floating-point dtype and merge there"
        )

    def add_to_weight_(self, delta: torch.Tensor) -> None:
        raise RuntimeError(self.merge_refusal())

    def write_weight_(self, matrix: torch.Tensor) -> None:
        raise RuntimeError(self.merge_refusal())


class Linear4bitSite(QuantizedLinearSite):
    bits = 4

    def weight_view(self) -> torch.Tensor:
        """W dequantised, (out_features, in_features): a temporary, for the computation that asked for it."""
        import bitsandbytes.functional as bnb_functional

        weight = self.module.weight
        return bnb_functional.dequantize_4bit(weight.data, weight.quant_state).to(self.dtype)


class Linear8bitSite(QuantizedLinearSite):
    bits = 8

    def weight_view(self) -> torch.Tensor:
        weight = self.module.weight
        scales = getattr(weight, "SCB", None)
        if scales is None:
            scales = self.module.state.SCB
        return (weight.data.to(torch.float32) * (scales.to(torch.float32)[:, None] / 127.0)).to(self.dtype)


def register() -> None:
    """Register bitsandbytes' layer types, if bitsandbytes is installed (a model can hold them only then)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return
    import bitsandbytes as bnb

    register_weight_site(bnb.nn.Linear4bit, Linear4bitSite)
    register_weight_site(bnb.nn.Linear8bitLt, Linear8bitSite)
