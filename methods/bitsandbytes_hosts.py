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

import copy
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

    def project_in(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``x`` in the adapter's dtype first: the layer casts its own input to the compute dtype, so the
        activations that reach it may be wider (float32 norms over a bfloat16-compute layer) or narrower."""
        return super().project_in(x if x.dtype == a.dtype else x.to(a.dtype), a)

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
            "would re-quantise the weight and lose precision. Run the adapter unmerged, or merge into a dequantised "
            "model with peftkit.merge_and_detach(model, dequantize=torch.bfloat16)"
        )

    def add_to_weight_(self, delta: torch.Tensor) -> None:
        raise RuntimeError(self.merge_refusal())

    def write_weight_(self, matrix: torch.Tensor) -> None:
        raise RuntimeError(self.merge_refusal())

    def weight_view(self) -> torch.Tensor:
        """W dequantised, (out_features, in_features): a temporary, for the computation that asked for it."""
        return self.dequantized_weight().to(self.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def dequantized(self, dtype: torch.dtype) -> nn.Linear:
        """A plain ``nn.Linear`` computing this layer's map, its weight dequantised into ``dtype``."""
        bias = self.module.bias
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=self.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dequantized_weight())
            if bias is not None:
                linear.bias.copy_(bias)
        return linear


class Linear4bitSite(QuantizedLinearSite):
    bits = 4

    def dequantized_weight(self) -> torch.Tensor:
        """W in float32, read from the packed blocks (from a copy in bitsandbytes' own layout when its CPU
        inference kernel has repacked them)."""
        import bitsandbytes.functional as bnb_functional

        data, state = self.module.weight.data, self.module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            data, state = bnb_functional._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
        return bnb_functional.dequantize_4bit(data, state).to(torch.float32)

    def requantized(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` after a round trip through this layer's 4-bit format (code book, block size, nested
        statistics): what a merge into it would keep."""
        import bitsandbytes.functional as bnb_functional

        state = self.module.weight.quant_state
        packed, new_state = bnb_functional.quantize_4bit(
            weight.to(device=self.device, dtype=torch.float32).contiguous(),
            blocksize=state.blocksize,
            compress_statistics=bool(getattr(state, "nested", False)),
            quant_type=state.quant_type,
        )
        return bnb_functional.dequantize_4bit(packed, new_state).to(weight.dtype)


class Linear8bitSite(QuantizedLinearSite):
    bits = 8

    def dequantized_weight(self) -> torch.Tensor:
        weight = self.module.weight
        scales = getattr(weight, "SCB", None)
        if scales is None:
            scales = self.module.state.SCB
        return weight.data.to(torch.float32) * (scales.to(torch.float32)[:, None] / 127.0)

    def requantized(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` after LLM.int8()'s row-wise absmax round trip, from float16 as bitsandbytes quantises."""
        import bitsandbytes.functional as bnb_functional

        rows, scales, _ = bnb_functional.int8_vectorwise_quant(weight.to(device=self.device, dtype=torch.float16))
        return (rows.to(torch.float32) * (scales.to(torch.float32)[:, None] / 127.0)).to(weight.dtype)


def register() -> None:
    """Register bitsandbytes' layer types, if bitsandbytes is installed (a model can hold them only then)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return
    import bitsandbytes as bnb

    register_weight_site(bnb.nn.Linear4bit, Linear4bitSite)
    register_weight_site(bnb.nn.Linear8bitLt, Linear8bitSite)
